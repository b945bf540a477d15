"""What the documentation must say: the store's integrity guarantees and their limits."""

from pathlib import Path

STORE_MD = Path(__file__).resolve().parents[1] / "docs" / "STORE.md"


def test_store_docs_say_checksums_guard_integrity_not_authenticity():
    text = " ".join(STORE_MD.read_text().split())
    assert "**Integrity, not authenticity.**" in text
    assert "CRC32 is not a signature" in text
    assert "whoever can write the disk tier's folder or the Redis database can put well-formed KV" in text
    assert "keep the disk folder writable only by the accounts that run the engine" in text
    assert "give Redis a password" in text
