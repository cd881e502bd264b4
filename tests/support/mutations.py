"""Near-miss mutations of a valid encoding, shared by the parser fuzz tests (the
hypothesis settings they share are in :mod:`support.fuzz`).

Truncations, single-bit flips, a duplicated line, a dropped blank line, a changed digit,
invalid UTF-8, the em dash replaced, stray whitespace, and random bytes.
"""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["mutations"]


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    n = len(data)
    lines = data.split(b"\n")

    def dup_line(i: int) -> bytes:
        i %= len(lines)
        return b"\n".join(lines[: i + 1] + lines[i:])

    def change_digit(i: int, d: int) -> bytes:
        digits = [j for j, c in enumerate(data) if 0x30 <= c <= 0x39] or [0]
        j = digits[i % len(digits)]
        return data[:j] + bytes([0x30 + d]) + data[j + 1 :]

    return st.one_of(
        st.integers(0, n).map(lambda i: data[:i]),
        st.integers(0, n * 8 - 1).map(
            lambda b: data[: b // 8] + bytes([data[b // 8] ^ (1 << (b % 8))]) + data[b // 8 + 1 :]
        ),
        st.integers(0, 1000).map(dup_line),
        st.sampled_from([data.replace(b"\n\n", b"\n", 1), data.replace(b"\n\n", b"\n")]),
        st.tuples(st.integers(0, 1000), st.integers(0, 9)).map(lambda t: change_digit(*t)),
        st.tuples(st.integers(0, n), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] :]
        ),
        st.just(data.replace("—".encode(), b"-")),
        st.tuples(st.integers(0, n), st.sampled_from([b" ", b"\t", b" \n", b"\r", b"\n"])).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] :]
        ),
        st.binary(max_size=300),
    )
