"""Benchmark xpmodel's BPE tokenizer against Hugging Face `tokenizers` (Rust).

Trains both at the same vocab size on one corpus (Tiny Shakespeare by
default), encodes the whole corpus with each, and prints seconds, bytes per
token and the ratios. Hugging Face is skipped when `tokenizers` is not
installed. This is a measurement, not a test: timings depend on the machine.

    python tools/bench_tokenizer.py [--data PATH] [--vocab-size 4096]
"""
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cli_args import ArgumentParser, DocstringFormatter, int_at_least, positive_int, text_file  # noqa: E402
from xpmodel.tokenizer.bpe import ENDOFTEXT, BPETokenizer  # noqa: E402


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def bench_xpmodel(text, vocab_size, workers):
    tokenizer, train_s = timed(BPETokenizer.train, text, vocab_size)
    ids, encode_s = timed(tokenizer.encode_ordinary, text)
    assert tokenizer.decode(ids) == text, "xpmodel round trip failed"
    chunks = text.splitlines(keepends=True)
    chunk_size = max(1, len(chunks) // (8 * workers))
    pieces = ["".join(chunks[i:i + chunk_size]) for i in range(0, len(chunks), chunk_size)]
    fresh = BPETokenizer(tokenizer.merges, tokenizer.special_tokens)  # cold encode cache
    arrays, parallel_s = timed(lambda: list(fresh.encode_chunks(pieces, workers=workers)))
    return {"train_s": train_s, "encode_s": encode_s, "tokens": len(ids),
            "parallel_s": parallel_s, "parallel_tokens": sum(len(a) for a in arrays)}


def bench_hf(text, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    _, train_s = timed(tokenizer.train_from_iterator, [text], trainer)
    encoding, encode_s = timed(tokenizer.encode, text)
    return {"train_s": train_s, "encode_s": encode_s, "tokens": len(encoding.ids),
            "vocab_size": tokenizer.get_vocab_size()}


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("--data", type=text_file,
                        default=str(REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"),
                        help="UTF-8 text file to train on and encode")
    parser.add_argument("--vocab-size", type=int_at_least(256), default=4096,
                        help="ids in all, at least the 256 byte ids")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes for the encode_chunks measurement")
    args = parser.parse_args()

    text = args.data.read_text(encoding="utf-8")
    num_bytes = len(text.encode("utf-8"))
    print(f"{args.data}: {num_bytes:,} bytes, vocab size {args.vocab_size}, "
          f"{os.cpu_count()} CPUs")

    ours = bench_xpmodel(text, args.vocab_size, args.workers)
    ours_bpt = num_bytes / ours["tokens"]
    print(f"xpmodel   train {ours['train_s']:6.2f} s   encode {ours['encode_s']:6.2f} s   "
          f"{ours_bpt:.3f} bytes/token")
    print(f"xpmodel   encode_chunks, {args.workers} workers, lines in {8 * args.workers} "
          f"chunks: {ours['parallel_s']:.2f} s, {ours['parallel_tokens']:,} tokens")

    try:
        hf = bench_hf(text, args.vocab_size)
    except ImportError:
        print("tokenizers is not installed: no Hugging Face comparison")
        return
    hf_bpt = num_bytes / hf["tokens"]
    print(f"HF (Rust) train {hf['train_s']:6.2f} s   encode {hf['encode_s']:6.2f} s   "
          f"{hf_bpt:.3f} bytes/token   (vocab {hf['vocab_size']})")
    print(f"xpmodel / HF: train {ours['train_s'] / hf['train_s']:.2f}x time, "
          f"encode {ours['encode_s'] / hf['encode_s']:.2f}x time, "
          f"compression {ours_bpt / hf_bpt:.4f}x bytes/token")


if __name__ == "__main__":
    main()
