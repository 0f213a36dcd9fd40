"""Texts the tests send: varied sentences for a real server, and hard inputs for the default model.

``sentence`` here is the client tests' (1 to 40 words); the in-process engine tests have their
own in tests/support/engine.py.
"""

from __future__ import annotations

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex and jinx the bold".split()


def sentence(i: int) -> str:
    """Distinct texts of varied length (1 to 40 words), so batches pad differently."""
    n = 1 + (i * 7) % 40
    return " ".join(WORDS[(i + k * 3) % len(WORDS)] for k in range(n)) + f" {i}"


LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press adapted from winemaking. Within a "
    "few decades, print shops had spread across Europe, and the price of books fell sharply. Scholars "
    "could compare identical copies of a text, which helped standardize spelling and grammar. "
    "Pamphlets carried news and arguments faster than ever before, feeding religious and political "
    "debates. Literacy rose as books became affordable to merchants and artisans, not only to clergy "
    "and nobles. Printers also produced maps, calendars and scientific tables, so that errors could "
    "be corrected in later editions rather than copied by hand. Historians still argue about how "
    "quickly these changes happened and how much the press caused them, but few doubt that it "
    "reshaped how knowledge was stored, shared and questioned for centuries to come. Modern "
    "digital publishing echoes these shifts, once again lowering the cost of copies."
)

SENTENCES = [
    "hi",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog!!! ... ???",
    "What's the weather like in São Paulo, Zürich and Kraków today?",
    "東京は日本の首都です。 Москва — столица России. 🙂🚀",
    "e = mc^2; f(x) = x**2 + 3*x - 7 (see §4.2, pp. 12-15) <tag attr='v'>",
    "   leading and trailing spaces   ",
    LONG_TEXT,
]
