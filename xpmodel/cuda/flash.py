"""Causal attention for 16-bit heads (float16 or bfloat16) of 64 dimensions on
GPUs of compute capability 8.0 or later, without the T x T matrices: scores,
probabilities and their gradients live in registers, a tile of 64 queries
against a tile of 64 keys at a time, on the tensor cores (mma.sync m16n8k16
with .f16 or .bf16 operands, float32 accumulation). One source serves both
types: the build's h16 (compile.py) is the heads' dtype.

Grouped-query attention is native: query head h reads key/value head
h / (H / H_kv) in place, so k and v are never repeated over their groups.

Forward keeps a running maximum and sum per query row (the online softmax)
and saves lse = max + log(sum) per row; backward recomputes the
probabilities from it. With dropout (the builds with DROPOUT 1), each
probability is kept or dropped by its counter-based random bits
(cuda/random.py), drawn again in backward: the sums and lse are those of
the probabilities before dropout, the output and dV use the dropped ones,
and the softmax backward takes dP times the mask (its row dot product is
still dout . out). A block of backward owns 64 keys of one key/value
head and walks the query tiles that see them, for each query head of the
head's group in turn, accumulating dK and dV in registers and adding its
share of dQ into a float32 buffer with atomics.
"""
import os

import numpy

from ..backend import import_cupy, is_half
from .compile import WARP_MATRIX, raw_kernel, stride_grid
from .random import RANDOM_BITS, dropout_threshold

HEAD_DIM = 64      # the kernels' fixed head size
TILE = 64          # queries and keys per tile; T must be a multiple
_THREADS = 128     # four warps, 16 rows of the tile each
_MAX_GRID_Y = 65535
# XPMODEL_FLASH=0 sends attention through the T x T scores instead (for comparisons)
ENABLED = os.environ.get("XPMODEL_FLASH", "1") != "0"

_SOURCE = WARP_MATRIX + RANDOM_BITS + r"""
#ifndef DROPOUT
#define DROPOUT 0
#endif
#define HD 64
#define TILE 64
#define PAD 72     // shared tile row in h16: 64 + 8 spreads a warp's reads over all banks
typedef unsigned int u32;

__device__ __forceinline__ u32 pack2(float low, float high) { return pack_h16x2(low, high); }

// rows [0, 64) x 64 h16 of global memory (rows `stride` apart) -> shared
// tile, copied asynchronously: landed after the cp_async_wait covering its group
__device__ __forceinline__ void load_tile(h16* tile, const h16* src, long long stride) {
    for (int i = threadIdx.x; i < TILE * HD / 8; i += blockDim.x) {
        int row = i >> 3, col = (i & 7) * 8;
        cp_async16(tile + row * PAD + col, src + row * stride + col);
    }
}

// Operands of mma_16816 from shared tiles (row-major, PAD h16 a row), for
// lane (g, t) = (lane / 4, lane % 4):
//   a_rows:    A[i][k] = tile[row0 + i][col0 + k]          (16 x 16)
//   a_columns: A[i][k] = tile[row0 + k][col0 + i]
//   b_rows:    two k-steps: b[2j..2j+1] holds B_j[k][n] = tile[row0 + n][col0 + 16 j + k]
//   b_columns: two column blocks: b[2j..2j+1] holds B_j[k][n] = tile[row0 + k][col0 + 8 j + n]
// each read with one ldmatrix. Lane l addresses row l % 8 of 8x8 matrix l / 8;
// bit 0 / bit 1 of the matrix index step 8 rows or 8 columns as `rows_first` says
__device__ __forceinline__ const h16* lane_row(const h16* tile, int row0, int col0, bool rows_first) {
    int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
    int row_step = rows_first ? (j & 1) : (j >> 1), col_step = rows_first ? (j >> 1) : (j & 1);
    return tile + (row0 + row_step * 8 + r) * PAD + col0 + col_step * 8;
}
__device__ __forceinline__ void a_rows(u32* a, const h16* tile, int row0, int col0) {
    ldmatrix_x4(a, lane_row(tile, row0, col0, true));
}
__device__ __forceinline__ void a_columns(u32* a, const h16* tile, int row0, int col0) {
    ldmatrix_x4_trans(a, lane_row(tile, row0, col0, false));
}
__device__ __forceinline__ void b_rows(u32* b, const h16* tile, int row0, int col0) {
    int lane = threadIdx.x & 31;
    ldmatrix_x4(b, tile + (row0 + (lane & 7)) * PAD + col0 + (lane >> 3) * 8);
}
__device__ __forceinline__ void b_columns(u32* b, const h16* tile, int row0, int col0) {
    ldmatrix_x4_trans(b, lane_row(tile, row0, col0, true));
}

// a (16 x 64) h16 row-major block of global memory as the A operands of 4 k-steps
__device__ __forceinline__ void load_a(u32 (&a)[4][4], const h16* src, long long stride, int g, int t) {
    #pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        const h16* p = src + ks * 16 + 2 * t;
        a[ks][0] = *(const u32*)(p + g * stride);
        a[ks][1] = *(const u32*)(p + (g + 8) * stride);
        a[ks][2] = *(const u32*)(p + g * stride + 8);
        a[ks][3] = *(const u32*)(p + (g + 8) * stride + 8);
    }
}

// NB column blocks of 8 float32 accumulators, c[NB][4] (16 x 8 NB), rounded to
// h16 as the A operands of NB / 2 k-steps (k-step ks: columns 16 ks .. 16 ks + 15)
template <int NB>
__device__ __forceinline__ void pack_a(u32 (&a)[NB / 2][4], const float (&c)[NB][4]) {
    #pragma unroll
    for (int ks = 0; ks < NB / 2; ks++) {
        a[ks][0] = pack2(c[2 * ks][0], c[2 * ks][1]);
        a[ks][1] = pack2(c[2 * ks][2], c[2 * ks][3]);
        a[ks][2] = pack2(c[2 * ks + 1][0], c[2 * ks + 1][1]);
        a[ks][3] = pack2(c[2 * ks + 1][2], c[2 * ks + 1][3]);
    }
}
// accumulator element c[nb][i], read back from pack_a's operands
template <int KS>
__device__ __forceinline__ float a_element(const u32 (&a)[KS][4], int nb, int i) {
    u32 word = a[nb >> 1][(i >> 1) + 2 * (nb & 1)];
    return h16_to_float((h16)((i & 1) ? word >> 16 : word & 0xffffu));
}

// c (16 x 8 NB) = a (16 x 64, A operands of 4 k-steps) @ rows col0 .. col0 + 8 NB - 1
// of tile (64 x 64), transposed: c[i][j] = sum_k a[i][k] tile[col0 + j][k]
template <int NB>
__device__ __forceinline__ void mma_a_tile_t(float (&c)[NB][4], const u32 (&a)[4][4], const h16* tile,
                                             int col0) {
    #pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.0f;
        #pragma unroll
        for (int ks = 0; ks < 4; ks += 2) {
            u32 b[4];
            b_rows(b, tile, col0 + nb * 8, ks * 16);
            mma_16816(c[nb], a[ks], b);
            mma_16816(c[nb], a[ks + 1], b + 2);
        }
    }
}

// as mma_a_tile_t, with a = rows row0 .. row0 + 15 of tile_a (64 x 64)
template <int NB>
__device__ __forceinline__ void mma_rows_tile_t(float (&c)[NB][4], const h16* tile_a, int row0,
                                                const h16* tile_b, int col0) {
    u32 a[4][4];
    #pragma unroll
    for (int ks = 0; ks < 4; ks++) a_rows(a[ks], tile_a, row0, ks * 16);
    mma_a_tile_t<NB>(c, a, tile_b, col0);
}

// c (16 x 64) += a (16 x 16 KS, A operands) @ rows k0 .. k0 + 16 KS - 1 of tile (64 x 64)
template <int KS>
__device__ __forceinline__ void mma_a_tile(float (&c)[8][4], const u32 (&a)[KS][4], const h16* tile, int k0) {
    #pragma unroll
    for (int ks = 0; ks < KS; ks++)
        #pragma unroll
        for (int nb = 0; nb < 8; nb += 2) {
            u32 b[4];
            b_columns(b, tile, k0 + ks * 16, nb * 8);
            mma_16816(c[nb], a[ks], b);
            mma_16816(c[nb + 1], a[ks], b + 2);
        }
}

// q (B, H, T, 64), already scaled by 1/sqrt(64), k, v (B, H / group, T, 64):
// query head bh = b H + h reads key/value head bh / group = b H_kv + h / group
// -> out (B*T, H*64), the heads side by side; lse (B, H, T) float32.
// With DROPOUT, probability (bh, query, key) is kept, times drop_scale, where
// random_bits(drop_key0, drop_key1, (bh T + query) T + key) >= drop_threshold.
// grid (T / 64, B * H); block 128: warp w owns queries 16 w .. 16 w + 15 of the tile
extern "C" __global__ void __launch_bounds__(128) flash_forward(const h16* q_heads, const h16* k_heads,
        const h16* v_heads, h16* out, float* lse, int H, int group, int T, unsigned drop_key0,
        unsigned drop_key1, unsigned drop_threshold, float drop_scale) {
    // keys and values of two tiles: the next one lands while one is computed
    __shared__ __align__(16) h16 kv_tiles[2][2][TILE * PAD];
    int q_tile = gridDim.x - 1 - blockIdx.x;          // the longest rows first
    int bh = blockIdx.y, b = bh / H, h = bh - b * H;
    long long head = (long long)T * HD;
    const h16* q = q_heads + bh * head;
    const h16* k = k_heads + bh / group * head;
    const h16* v = v_heads + bh / group * head;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = q_tile * TILE + warp * 16;
    u32 qa[4][4];
    load_a(qa, q + (long long)row0 * HD, HD, g, t);
    float o[8][4];
    #pragma unroll
    for (int nb = 0; nb < 8; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.0f, 0.0f};   // rows g, g + 8
    load_tile(kv_tiles[0][0], k, HD);
    load_tile(kv_tiles[0][1], v, HD);
    cp_async_commit();
    for (int kt = 0; kt <= q_tile; kt++) {
        const h16* k_tile = kv_tiles[kt & 1][0];
        const h16* v_tile = kv_tiles[kt & 1][1];
        if (kt < q_tile) {                             // the other buffer was read last round
            load_tile(kv_tiles[(kt + 1) & 1][0], k + (long long)(kt + 1) * TILE * HD, HD);
            load_tile(kv_tiles[(kt + 1) & 1][1], v + (long long)(kt + 1) * TILE * HD, HD);
        }
        cp_async_commit();
        cp_async_wait<1>();                            // tile kt has landed
        __syncthreads();
        float s[8][4];                                 // scores, 16 queries x 64 keys
        mma_a_tile_t<8>(s, qa, k_tile, 0);
        if (kt == q_tile) {                            // the diagonal tile: hide the future
            #pragma unroll
            for (int nb = 0; nb < 8; nb++)
                #pragma unroll
                for (int i = 0; i < 4; i++)
                    if (nb * 8 + 2 * t + (i & 1) > warp * 16 + g + 8 * (i >> 1)) s[nb][i] = NEG_INF;
        }
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            float m = row_max[r];
            #pragma unroll
            for (int nb = 0; nb < 8; nb++) m = fmaxf(m, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            float rescale = EXP(row_max[r] - m);       // 0 on the first tile
            row_max[r] = m;
            float sum = 0.0f;
            #pragma unroll
            for (int nb = 0; nb < 8; nb++) {
                s[nb][2 * r] = EXP(s[nb][2 * r] - m);
                s[nb][2 * r + 1] = EXP(s[nb][2 * r + 1] - m);
                sum += s[nb][2 * r] + s[nb][2 * r + 1];
                o[nb][2 * r] *= rescale;
                o[nb][2 * r + 1] *= rescale;
            }
            row_sum[r] = row_sum[r] * rescale + sum;   // this lane's columns only
        }
#if DROPOUT
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            unsigned long long first = ((unsigned long long)bh * T + row0 + g + 8 * r) * T
                                       + kt * TILE + 2 * t;
            #pragma unroll
            for (int nb = 0; nb < 8; nb++)
                #pragma unroll
                for (int c = 0; c < 2; c++) {
                    bool keep = random_bits(drop_key0, drop_key1, first + nb * 8 + c) >= drop_threshold;
                    s[nb][2 * r + c] *= keep ? drop_scale : 0.0f;
                }
        }
#endif
        u32 p[4][4];
        pack_a<8>(p, s);
        mma_a_tile<4>(o, p, v_tile, 0);
        __syncthreads();                               // the tiles are read
    }
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        float inv = 1.0f / sum;
        int row = row0 + g + 8 * r;
        h16* dst = out + ((long long)b * T + row) * H * HD + h * HD + 2 * t;
        #pragma unroll
        for (int nb = 0; nb < 8; nb++)
            *(u32*)(dst + nb * 8) = pack2(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
        if (t == 0) lse[(long long)bh * T + row] = row_max[r] + logf(sum);
    }
}

// delta (B, H, T) = the row sums of dout * out, both (B*T, H*64): the softmax
// backward's dot product of each row. One thread per (b, t, h) row.
extern "C" __global__ void flash_delta(const h16* dout, const h16* out, float* delta,
        int B, int H, int T) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * T * H) return;
    long long bt = i / H;
    int h = (int)(i - bt * H);
    long long b = bt / T, t = bt - b * T;
    const uint4* x = (const uint4*)(dout + i * HD);
    const uint4* y = (const uint4*)(out + i * HD);
    float sum = 0.0f, xs[8], ys[8];
    #pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        unpack8(x[j], xs);
        unpack8(y[j], ys);
        #pragma unroll
        for (int e = 0; e < 8; e++) sum += xs[e] * ys[e];
    }
    delta[(b * H + h) * T + t] = sum;
}

// the rows of query tile `query0` of query head bh: q, dout, lse and delta into
// shared memory, asynchronously: landed after the cp_async_wait covering its group
__device__ __forceinline__ void load_queries(h16* q_tile, h16* do_tile, float* lse_tile, float* delta_tile,
        const h16* q_heads, const h16* dout, const float* lse, const float* delta, int bh, int query0,
        int H, int T) {
    int b = bh / H, h = bh - b * H;
    load_tile(q_tile, q_heads + ((long long)bh * T + query0) * HD, HD);
    load_tile(do_tile, dout + ((long long)b * T + query0) * H * HD + h * HD, (long long)H * HD);
    const float* row_stats = (threadIdx.x < 16 ? lse : delta) + (long long)bh * T + query0;
    float* tile = threadIdx.x < 16 ? lse_tile : delta_tile;
    int chunk = threadIdx.x & 15;                      // 4 floats each
    if (threadIdx.x < 32) cp_async16(tile + 4 * chunk, row_stats + 4 * chunk);
}

// q, k, v as forward's; dout (B*T, H*64), lse and delta (B, H, T) -> dk, dv
// (B, H / group, T, 64) written; dq_acc (B, H, T, 64) float32 (zeroed) gets
// this block's share of dq added.
// grid (T / 64, B * H / group); block 128: warp w owns keys 16 w .. 16 w + 15 of the tile.
// A block owns one tile of keys of key/value head kv and walks the query tiles
// that see it for each query head of kv's group in turn (kv group .. kv group
// + group - 1), the next tile's copy in flight while one is computed, the next
// head's first after a head's last. So dk and dv are summed over the group in
// registers and written once: no atomics and no per-query-head copies to sum
// afterwards, and the same order of additions every run. The price is group
// times fewer blocks, B * H_kv * T / 64, still several per multiprocessor at
// training shapes. With group 1 it is the multi-head kernel: one head, one pass.
extern "C" __global__ void __launch_bounds__(128) flash_backward(const h16* q_heads, const h16* k_heads,
        const h16* v_heads, const h16* dout, const float* lse, const float* delta, h16* dk_heads,
        h16* dv_heads, float* dq_acc, int H, int group, int T, unsigned drop_key0, unsigned drop_key1,
        unsigned drop_threshold, float drop_scale) {
    __shared__ __align__(16) h16 q_tile[TILE * PAD];
    __shared__ __align__(16) h16 do_tile[TILE * PAD];
    __shared__ __align__(16) h16 k_tile[TILE * PAD];
    __shared__ __align__(16) h16 v_tile[TILE * PAD];
    __shared__ __align__(16) h16 ds_tile[TILE * PAD];  // dscores transposed: keys x queries
    __shared__ __align__(16) float lse_tile[TILE], delta_tile[TILE];
    int k_tile_index = blockIdx.x;                     // tile 0 sees the most queries: first
    int kv = blockIdx.y, tiles = T / TILE;
    int bh = kv * group, last_bh = bh + group - 1;     // the query head now, the group's last
    long long head = (long long)T * HD;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int key0 = k_tile_index * TILE;
    load_tile(k_tile, k_heads + ((long long)kv * T + key0) * HD, HD);
    load_tile(v_tile, v_heads + ((long long)kv * T + key0) * HD, HD);
    load_queries(q_tile, do_tile, lse_tile, delta_tile, q_heads, dout, lse, delta, bh, key0, H, T);
    cp_async_commit();
    float dk[8][4], dv[8][4];
    #pragma unroll
    for (int nb = 0; nb < 8; nb++)
        #pragma unroll
        for (int i = 0; i < 4; i++) dk[nb][i] = dv[nb][i] = 0.0f;
    for (int qt = k_tile_index; qt < tiles;) {
        cp_async_wait<0>();
        __syncthreads();                               // the query tile (and k, v) in place
        // 32 queries at a time: probabilities^T, 16 keys x 32 queries, and dscores^T
        #pragma unroll 1
        for (int half = 0; half < TILE; half += 32) {
            u32 p[2][4], ds[2][4];
#if DROPOUT
            unsigned kept = 0;                         // bit 4 nb + i: element (nb, i) kept
            {
                unsigned long long first = ((unsigned long long)bh * T + qt * TILE + half + 2 * t) * T
                                           + key0 + warp * 16 + g;
                #pragma unroll
                for (int nb = 0; nb < 4; nb++)
                    #pragma unroll
                    for (int i = 0; i < 4; i++) {
                        unsigned long long index = first + (unsigned long long)(nb * 8 + (i & 1)) * T
                                                   + 8 * (i >> 1);
                        bool keep = random_bits(drop_key0, drop_key1, index) >= drop_threshold;
                        kept |= (unsigned)keep << (4 * nb + i);
                    }
            }
#endif
            {
                float s[4][4];
                mma_rows_tile_t<4>(s, k_tile, warp * 16, q_tile, half);
                #pragma unroll
                for (int nb = 0; nb < 4; nb++)
                    #pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int query = half + nb * 8 + 2 * t + (i & 1), key = warp * 16 + g + 8 * (i >> 1);
                        bool future = qt == k_tile_index && key > query;
                        s[nb][i] = future ? 0.0f : EXP(s[nb][i] - lse_tile[query]);
                    }
                pack_a<4>(p, s);
            }
#if DROPOUT
            u32 dropped[2][4];                         // p times the mask's scale or 0
            {
                float z[4][4];
                #pragma unroll
                for (int nb = 0; nb < 4; nb++)
                    #pragma unroll
                    for (int i = 0; i < 4; i++)
                        z[nb][i] = (kept >> (4 * nb + i) & 1) ? a_element<2>(p, nb, i) * drop_scale : 0.0f;
                pack_a<4>(dropped, z);
            }
#endif
#if DROPOUT
            mma_a_tile<2>(dv, dropped, do_tile, half); // dv += dropout(p)^T @ dout
#else
            mma_a_tile<2>(dv, p, do_tile, half);       // dv += p^T @ dout
#endif
            {
                float dp[4][4];                        // dprobs^T = v @ dout^T
                mma_rows_tile_t<4>(dp, v_tile, warp * 16, do_tile, half);
                #pragma unroll
                for (int nb = 0; nb < 4; nb++)
                    #pragma unroll
                    for (int i = 0; i < 4; i++) {
#if DROPOUT
                        dp[nb][i] = (kept >> (4 * nb + i) & 1) ? dp[nb][i] * drop_scale : 0.0f;
#endif
                        dp[nb][i] = a_element<2>(p, nb, i)
                                    * (dp[nb][i] - delta_tile[half + nb * 8 + 2 * t + (i & 1)]);
                    }
                pack_a<4>(ds, dp);
            }
            mma_a_tile<2>(dk, ds, q_tile, half);       // dk += dscores^T @ q
            #pragma unroll
            for (int ks = 0; ks < 2; ks++) {           // as pack_a laid the operands out
                h16* row = ds_tile + (warp * 16 + g) * PAD + half + ks * 16 + 2 * t;
                *(u32*)row = ds[ks][0];
                *(u32*)(row + 8 * PAD) = ds[ks][1];
                *(u32*)(row + 8) = ds[ks][2];
                *(u32*)(row + 8 * PAD + 8) = ds[ks][3];
            }
        }
        __syncthreads();                               // dscores shared; the query tile is free
        int next_qt = qt + 1, next_bh = bh;
        if (next_qt == tiles && bh < last_bh) next_qt = k_tile_index, next_bh = bh + 1;
        if (next_qt < tiles)                           // lands while dq is computed
            load_queries(q_tile, do_tile, lse_tile, delta_tile, q_heads, dout, lse, delta, next_bh,
                         next_qt * TILE, H, T);
        cp_async_commit();
        // dq (this warp's 16 queries x 64) += dscores (queries x 64 keys) @ k
        float dq[8][4];
        #pragma unroll
        for (int nb = 0; nb < 8; nb++) dq[nb][0] = dq[nb][1] = dq[nb][2] = dq[nb][3] = 0.0f;
        u32 a[4][4];
        #pragma unroll
        for (int ks = 0; ks < 4; ks++) a_columns(a[ks], ds_tile, ks * 16, warp * 16);
        mma_a_tile<4>(dq, a, k_tile, 0);
        float* dst = dq_acc + ((long long)bh * T + qt * TILE + warp * 16 + g) * HD + 2 * t;
        #pragma unroll
        for (int nb = 0; nb < 8; nb++) {
            atomic_add2(dst + nb * 8, dq[nb][0], dq[nb][1]);
            atomic_add2(dst + 8 * HD + nb * 8, dq[nb][2], dq[nb][3]);
        }
        qt = next_qt;
        bh = next_bh;
    }
    h16* dkv[2] = {dk_heads + kv * head, dv_heads + kv * head};
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        long long row = key0 + warp * 16 + g + 8 * r;
        #pragma unroll
        for (int nb = 0; nb < 8; nb++) {
            *(u32*)(dkv[0] + row * HD + nb * 8 + 2 * t) = pack2(dk[nb][2 * r], dk[nb][2 * r + 1]);
            *(u32*)(dkv[1] + row * HD + nb * 8 + 2 * t) = pack2(dv[nb][2 * r], dv[nb][2 * r + 1]);
        }
    }
}

// dq (h16) = dq_acc (float32) * scale, n values
extern "C" __global__ void flash_dq_store(const float* dq_acc, h16* dq, long long n, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dq[i] = float_to_h16(dq_acc[i] * scale);
}
"""


def flash_applies(heads, dropout_p, rng=None):
    """Whether the kernels serve these heads (empty_heads' form): float16 or
    bfloat16, each part contiguous and 16-byte aligned, D = 64, T a multiple
    of 64, B * H within a grid's second dimension, dropout on the
    probabilities only from a generator that gives stream keys
    (cuda.random.CounterGenerator), a GPU of compute capability 8.0 or later
    (and XPMODEL_FLASH not 0)."""
    q = heads[0]
    B, H, T, D = q.shape
    return (ENABLED and is_half(q.dtype) and D == HEAD_DIM and T % TILE == 0
            and all(part.flags.c_contiguous and part.data.ptr % 16 == 0 for part in heads)
            and B * H <= _MAX_GRID_Y and (not dropout_p or hasattr(rng, "next_key"))
            and _has_mma())


def empty_heads(B, H, H_kv, T, D, dtype):
    """Uninitialised attention heads, or their gradients, in the form the
    attention core reads: q (B, H, T, D) and k, v (B, H_kv, T, D). One
    (3, B, H, T, D) array when H_kv = H (GPT-2's head split and merge move it
    as one), else the three arrays, H + 2 H_kv heads in all."""
    cupy = import_cupy()
    if H_kv == H:
        return cupy.empty((3, B, H, T, D), dtype=dtype)
    return (cupy.empty((B, H, T, D), dtype=dtype), cupy.empty((B, H_kv, T, D), dtype=dtype),
            cupy.empty((B, H_kv, T, D), dtype=dtype))


_compute_capability = {}


def _has_mma():
    """Whether the current GPU runs mma.sync m16n8k16 and cp.async (sm_80 and later)."""
    device = import_cupy().cuda.Device()
    if device.id not in _compute_capability:
        _compute_capability[device.id] = int(device.compute_capability)
    return _compute_capability[device.id] >= 80


def _kernel(name, half, dropout=None):
    """Kernel `name` of the build for `half` heads, with dropout or without
    (a backward's kernels all come from its forward's build)."""
    return raw_kernel(_SOURCE, name, half=half, DROPOUT=int(dropout is not None))


def _dropout_arguments(dropout):
    """The kernels' last four arguments: (key0, key1, threshold, scale) of
    dropout = (rate, (key0, key1)), or zeros without dropout."""
    if dropout is None:
        return numpy.uint32(0), numpy.uint32(0), numpy.uint32(0), numpy.float32(0.0)
    rate, (key0, key1) = dropout
    return (numpy.uint32(key0), numpy.uint32(key1), *dropout_threshold(rate))


def _check_vector_operands(*arrays):
    """The kernels move every operand in 16-byte vectors (cp.async, uint4): each
    must be C-contiguous from a 16-byte aligned start, as fresh CuPy arrays are."""
    for array in arrays:
        if not array.flags.c_contiguous or array.data.ptr % 16:
            raise ValueError(f"flash attention: an operand of shape {array.shape} is not "
                             f"C-contiguous from a 16-byte aligned start")


def flash_forward(heads, dropout=None):
    """heads: q (B, H, T, 64), scaled, k, v (B, H_kv, T, 64) (empty_heads' form),
    float16 or bfloat16, as flash_applies requires -> out (B*T, H*64) in the
    heads' dtype, lse (B, H, T) float32. dropout: (rate, stream key) of the
    dropout on the probabilities (cuda/random.py), or None."""
    cupy = import_cupy()
    q, k, v = heads
    _check_vector_operands(q, k, v)
    B, H, T, _ = q.shape
    out = cupy.empty((B * T, H * HEAD_DIM), dtype=q.dtype)
    lse = cupy.empty((B, H, T), dtype=numpy.float32)
    _kernel("flash_forward", q.dtype, dropout)((T // TILE, B * H), (_THREADS,),
                                               (q, k, v, out, lse, numpy.int32(H),
                                                numpy.int32(H // k.shape[1]), numpy.int32(T),
                                                *_dropout_arguments(dropout)))
    return out, lse


def flash_backward(dout, heads, out, lse, q_scale, dropout=None):
    """dout, out: (B*T, H*64) in the heads' dtype; heads, lse and dropout as
    forward's -> dheads in the heads' form (empty_heads), dk and dv of the
    H_kv key/value heads themselves, dq with respect to the unscaled q
    (q_scale is the factor the split applied)."""
    cupy = import_cupy()
    q, k, v = heads
    B, H, T, _ = q.shape
    H_kv = k.shape[1]
    dout = cupy.ascontiguousarray(dout, dtype=q.dtype)
    if dout.data.ptr % 16:          # the kernels copy 16-byte vectors of it
        dout = dout.copy()
    _check_vector_operands(q, k, v, out, lse)
    rows = B * T * H
    delta = cupy.empty((B, H, T), dtype=numpy.float32)
    _kernel("flash_delta", q.dtype, dropout)(((rows + 255) // 256,), (256,),
                                    (dout, out, delta, numpy.int32(B), numpy.int32(H), numpy.int32(T)))
    dheads = empty_heads(B, H, H_kv, T, HEAD_DIM, q.dtype)
    dq, dk, dv = dheads
    dq_acc = cupy.zeros((B, H, T, HEAD_DIM), dtype=numpy.float32)
    _kernel("flash_backward", q.dtype, dropout)((T // TILE, B * H_kv), (_THREADS,),
                                                (q, k, v, dout, lse, delta, dk, dv, dq_acc,
                                                 numpy.int32(H), numpy.int32(H // H_kv),
                                                 numpy.int32(T), *_dropout_arguments(dropout)))
    n = dq_acc.size
    _kernel("flash_dq_store", q.dtype, dropout)(*stride_grid(n), (dq_acc, dq, numpy.int64(n),
                                                                  numpy.float32(q_scale)))
    return dheads
