"""`python -m studio.core.tokenize_worker BACKEND_JSON`: the UTF-8 text on standard input,
encoded without special tokens by the tokenizer serialized in BACKEND_JSON; its ids go to
standard output as little-endian int32.

`tokenizer_cache` runs it so that the tokenizer's parse, which holds the interpreter's lock for
its whole length, happens outside the studio's process. It imports `tokenizers` only.
"""
from __future__ import annotations

import sys
from array import array


def main() -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(sys.argv[1])
    # As transformers calls it without truncation or padding (the file keeps the last call's).
    tokenizer.no_truncation()
    tokenizer.no_padding()
    text = sys.stdin.buffer.read().decode("utf-8")
    ids = array("i", tokenizer.encode(text, add_special_tokens=False).ids)
    if sys.byteorder != "little":
        ids.byteswap()
    sys.stdout.buffer.write(ids.tobytes())


if __name__ == "__main__":
    main()
