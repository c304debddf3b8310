// The CUDA features xpmodel's raw kernels use, on one CPU thread, so the
// kernels' logic is tested where there is no GPU.
//
// Every CUDA thread of a block is a fiber with its own stack;
// blocks run one after another. __syncthreads and the warp shuffles are real
// barriers: a fiber waits until every thread of its block (or lanes of its
// warp) has arrived, so a missing or divergent barrier is reported as a
// deadlock instead of passing silently. Static __shared__ arrays are
// function statics, which is sound because one block runs at a time.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#define __global__
// static: a device function is its kernel library's own, and so is a __shared__
// array declared in one (as an inline function's static it would be one symbol
// that the loader merges across every library of the process)
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

using std::exp;
using std::log;
using std::sqrt;
using std::fmax;
using std::fmin;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

// one CPU thread runs every fiber, so an atomic is a plain read-modify-write
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }

namespace xpemu {

constexpr size_t STACK_BYTES = 1024 * 1024;   // the sanitizer runtime reports on the fiber's stack

enum class Wait { none, block, warp, done };

// Switching fibers. On x86-64 a hand-written switch saves the callee-saved
// registers and swaps stacks (a few nanoseconds); elsewhere ucontext, whose
// switch also saves the signal mask with a system call.
#if defined(__x86_64__)
extern "C" void xpemu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl xpemu_switch
    .hidden xpemu_switch
    .type xpemu_switch, @function
xpemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

struct Context {
    void* sp = nullptr;
};

// a context that starts `entry` on the stack [stack, stack + bytes)
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + bytes)) & ~(uintptr_t)15;
    void** sp = (void**)(top - 8 * sizeof(void*));
    for (int i = 0; i < 6; i++) sp[i] = nullptr;    // r15 r14 r13 r12 rbx rbp
    sp[6] = (void*)entry;                          // popped by ret: entry sees rsp % 16 == 8
    sp[7] = nullptr;
    c.sp = sp;
}
inline void switch_context(Context& save, Context& load) { xpemu_switch(&save.sp, load.sp); }
#else
struct Context {
    ucontext_t uc;
};
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
#endif

struct PendingCopy { void* dst; const void* src; int group; };

struct Fiber {
    Context context;
    char* stack = nullptr;
    Wait wait = Wait::none;
    std::vector<PendingCopy> copies;   // cp.async copies issued, not yet waited for
    int committed = 0;                 // cp.async groups committed
};

// fiber stacks, kept from launch to launch (left uninitialised: untouched pages cost nothing)
inline char* stack_of(int thread) {
    static std::vector<char*> stacks;
    while ((int)stacks.size() <= thread) stacks.push_back(new char[STACK_BYTES]);
    return stacks[thread];
}

struct Warp {
    unsigned long long slots[2][32];   // shuffle values, double-buffered by generation
    unsigned generation = 0;
};

struct Launch {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Context scheduler;
    int current = 0;
    const char* error = nullptr;
    void (*body)() = nullptr;
};

inline Launch* launch_state = nullptr;

inline int flat_thread() { return launch_state->current; }
inline int lane_id() { return flat_thread() % 32; }

inline void set_thread_index(int flat) {
    threadIdx.x = flat % blockDim.x;
    threadIdx.y = (flat / blockDim.x) % blockDim.y;
    threadIdx.z = flat / (blockDim.x * blockDim.y);
}

// give control back to the scheduler until this fiber may run again
inline void park(Wait why) {
    Launch& L = *launch_state;
    L.fibers[L.current].wait = why;
    switch_context(L.fibers[L.current].context, L.scheduler);
}

inline void fail(const char* message) {
    if (!launch_state->error) launch_state->error = message;
    park(Wait::done);
}

inline void fiber_main() {
    launch_state->body();
    park(Wait::done);
}

// Run every fiber until all are done; release a barrier once all its
// participants wait at it. Returns false on deadlock or error.
inline bool run_block(int threads) {
    Launch& L = *launch_state;
    for (int t = 0; t < threads; t++) {
        Fiber& f = L.fibers[t];
        start_context(f.context, f.stack, STACK_BYTES, fiber_main);
        f.wait = Wait::none;
        f.copies.clear();
        f.committed = 0;
    }
    // Fibers run in an order that changes every round, so a kernel that
    // relies on one thread running before another without a barrier
    // between them reads stale values here, as it can on a GPU.
    static unsigned long long order_seed = 0x9E3779B97F4A7C15ull;
    while (true) {
        bool progressed = false;
        order_seed = order_seed * 6364136223846793005ull + 1442695040888963407ull;
        int stride = 1 + 2 * (int)((order_seed >> 33) % 16);
        while (std::gcd(stride, threads) != 1) stride -= 2;      // coprime: visits every fiber
        int first = (int)((order_seed >> 17) % threads);
        for (int i = 0; i < threads && !L.error; i++) {
            int t = (first + i * stride) % threads;
            if (L.fibers[t].wait != Wait::none) continue;
            L.current = t;
            set_thread_index(t);
            switch_context(L.scheduler, L.fibers[t].context);
            progressed = true;
        }
        if (L.error) return false;
        int done = 0, at_block = 0;
        for (int t = 0; t < threads; t++) {
            done += L.fibers[t].wait == Wait::done;
            at_block += L.fibers[t].wait == Wait::block;
        }
        if (done == threads) return true;
        if (at_block == threads) {
            for (int t = 0; t < threads; t++) L.fibers[t].wait = Wait::none;
            continue;
        }
        // release a random non-empty subset of the warps whose 32 lanes all wait, so warps drift apart
        std::vector<size_t> ready;
        for (size_t w = 0; w < L.warps.size(); w++) {
            int lanes = 0;
            for (int t = 32 * (int)w; t < threads && t < 32 * (int)w + 32; t++)
                lanes += L.fibers[t].wait == Wait::warp;
            if (lanes == 32) ready.push_back(w);
        }
        for (size_t i = 0; i < ready.size(); i++) {
            order_seed = order_seed * 6364136223846793005ull + 1442695040888963407ull;
            bool last_chance = i + 1 == ready.size() && !progressed;
            if ((order_seed >> 40) % 3 != 0 && !last_chance) continue;
            size_t w = ready[i];
            for (int t = 32 * (int)w; t < 32 * (int)w + 32; t++) L.fibers[t].wait = Wait::none;
            L.warps[w].generation++;
            progressed = true;
        }
        if (!progressed) {
            L.error = at_block ? "deadlock: __syncthreads not reached by every thread of the block"
                               : "deadlock: a warp shuffle not reached by all 32 lanes";
            return false;
        }
    }
}

template <class T>
T shuffle(unsigned mask, T value, int source_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu) fail("warp shuffle with a partial mask is not emulated");
    Launch& L = *launch_state;
    if (blockDim.x * blockDim.y * blockDim.z % 32 != 0) fail("warp shuffle in a block of partial warps");
    Warp& warp = L.warps[flat_thread() / 32];
    unsigned buffer = warp.generation % 2;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    warp.slots[buffer][lane_id()] = bits;
    park(Wait::warp);
    T out;
    std::memcpy(&out, &warp.slots[buffer][source_lane & 31], sizeof(T));
    return out;
}

// ldmatrix .x4: lane 8j + r holds the address of row r of matrix j
inline void ldmatrix_x4(unsigned* r, const void* row, bool transposed) {
    if (reinterpret_cast<uintptr_t>(row) % 16) fail("ldmatrix: a row address not 16-byte aligned");
    unsigned long long mine = reinterpret_cast<uintptr_t>(row);
    int lane = lane_id(), g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; j++) {
        if (transposed) {
            auto a = reinterpret_cast<const unsigned short*>(shuffle(0xffffffffu, mine, 8 * j + 2 * t));
            auto b = reinterpret_cast<const unsigned short*>(shuffle(0xffffffffu, mine, 8 * j + 2 * t + 1));
            r[j] = a[g] | (unsigned)b[g] << 16;
        } else {
            auto a = reinterpret_cast<const unsigned short*>(shuffle(0xffffffffu, mine, 8 * j + g));
            r[j] = a[2 * t] | (unsigned)a[2 * t + 1] << 16;
        }
    }
}

inline void cp_async16(void* dst, const void* src) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
        fail("cp.async: an address not 16-byte aligned");
    Fiber& f = launch_state->fibers[flat_thread()];
    f.copies.push_back(PendingCopy{dst, src, f.committed});
    std::memset(dst, 0xff, 16);   // in flight: neither the old bytes nor the new
}
inline void cp_async_commit() { launch_state->fibers[flat_thread()].committed++; }
// the copies of every committed group but the newest `pending` land now
inline void cp_async_wait(int pending) {
    Fiber& f = launch_state->fibers[flat_thread()];
    std::vector<PendingCopy> later;
    for (const PendingCopy& c : f.copies) {
        if (c.group < f.committed - pending) std::memcpy(c.dst, c.src, 16);
        else later.push_back(c);
    }
    f.copies.swap(later);
}

template <class... A, size_t... I>
std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<A...>(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// Launch `kernel` over grid x block; args[i] points to the i-th argument's
// bytes, sizes[i] says how many the caller passed (checked against the
// kernel's parameter). Writes an error message and returns 1 on failure.
template <class... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, void** args,
           const int* sizes, int n_args, char* message, int message_size) {
    auto report = [&](const char* text) { std::snprintf(message, message_size, "%s", text); return 1; };
    if (n_args != (int)sizeof...(A)) return report("wrong number of kernel arguments");
    const size_t expected[] = {sizeof(A)..., 0};
    for (int i = 0; i < n_args; i++) {
        if ((size_t)sizes[i] != expected[i]) {
            std::snprintf(message, message_size, "argument %d is %d bytes, the kernel takes %zu",
                          i, sizes[i], expected[i]);
            return 1;
        }
    }
    static std::tuple<A...> values;
    values = unpack<A...>(args, std::index_sequence_for<A...>{});
    static void (*the_kernel)(A...);
    the_kernel = kernel;
    Launch L;
    L.body = [] { std::apply(the_kernel, values); };
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    int threads = block[0] * block[1] * block[2];
    if (threads < 1 || threads > 1024) return report("block size must be 1..1024 threads");
    L.fibers.resize(threads);
    for (int t = 0; t < threads; t++) L.fibers[t].stack = stack_of(t);
    L.warps.resize((threads + 31) / 32);
    launch_state = &L;
    for (unsigned z = 0; z < grid[2]; z++)
        for (unsigned y = 0; y < grid[1]; y++)
            for (unsigned x = 0; x < grid[0]; x++) {
                blockIdx = uint3{x, y, z};
                if (!run_block(threads)) {
                    launch_state = nullptr;
                    std::snprintf(message, message_size, "block (%u, %u, %u): %s", x, y, z, L.error);
                    return 1;
                }
            }
    launch_state = nullptr;
    return 0;
}

}  // namespace xpemu

template <class T> inline T __shfl_sync(unsigned mask, T v, int lane, int width = 32) {
    return xpemu::shuffle(mask, v, (xpemu::lane_id() & ~(width - 1)) | (lane & (width - 1)));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return xpemu::shuffle(mask, v, xpemu::lane_id() ^ lane_mask);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = xpemu::lane_id();
    int source = (lane % width) + (int)delta < width ? lane + (int)delta : lane;
    return xpemu::shuffle(mask, v, source);
}
inline void __syncthreads() { xpemu::park(xpemu::Wait::block); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    xpemu::shuffle(mask, 0, xpemu::lane_id());
}
