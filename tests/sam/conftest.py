"""The SAM tests compare against Meta's segment_anything (the `test` extra): skip them, with
the reason, where it is not installed (e.g. an offline GPU machine without its wheel)."""
import pytest

pytest.importorskip("segment_anything", reason="segment_anything (the SAM reference) is not installed")
