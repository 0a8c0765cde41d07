"""How an octa3d error reaches the user: whole, its list capped with the full text in a file,
a DataLoader worker's traceback reduced to the worker's own message."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from octa3d.errors import MAX_LISTED, DataError, error_message, format_error

ADVICE = "fix or restore these files, or move these subjects' folders out of the data root"


def listing(n: int) -> str:
    """A discovery-style message: a first line, ``n`` indented subjects, the advice."""
    items = [f"  {10001 + i}: OCTA folder /d/OCTA_6mm/OCTA/{10001 + i}: 3.bmp: truncated" for i in range(n)]
    return "\n".join([f"/d: {n} subject(s) have slice folders that cannot be read as one volume:", *items, ADVICE])


def test_short_messages_are_printed_as_they_are():
    assert format_error("--lr: cannot read 'nan' as float") == "--lr: cannot read 'nan' as float"
    assert format_error(listing(3)) == listing(3)
    assert format_error(listing(MAX_LISTED)) == listing(MAX_LISTED)  # up to the cap: nothing saved, nothing cut
    assert format_error("first line\n  one item") == "first line\n  one item"


def test_a_long_list_is_capped_and_saved_whole():
    saved: list[str] = []

    def save(text: str) -> str:
        saved.append(text)
        return "/runs/e/errors/20261201-101500.txt"

    text = listing(57)
    lines = format_error(text, save).splitlines()
    assert saved == [text]
    assert lines[0] == text.splitlines()[0] and lines[-1] == ADVICE
    assert lines[1:MAX_LISTED + 1] == text.splitlines()[1:MAX_LISTED + 1]  # the first 20 subjects, in order
    assert lines[MAX_LISTED + 1] == "  … and 37 more (full list in /runs/e/errors/20261201-101500.txt)"
    assert len(lines) == MAX_LISTED + 3
    # nowhere to save it: still capped, the count without a path
    assert format_error(text, lambda _t: None).splitlines()[MAX_LISTED + 1] == "  … and 37 more"
    assert format_error(text, None, limit=5).splitlines()[6] == "  … and 52 more"


class _Broken(Dataset):
    def __init__(self, message: str) -> None:
        self.message = message

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        try:
            raise DataError("/d/v.nii.gz is truncated")
        except DataError as exc:  # chained, as the presets wrap a reader's error: two tracebacks in the message
            raise DataError(self.message) from exc


@pytest.mark.parametrize("message", ["subject v: /d/v.nii.gz is truncated (4 of 6 slices)",
                                     listing(2)])
def test_a_dataloader_worker_traceback_is_reduced_to_the_original_message(message):
    with pytest.raises(DataError) as err:
        next(iter(DataLoader(_Broken(message), num_workers=1)))
    assert str(err.value).startswith("Caught DataError in DataLoader worker process 0.\nOriginal Traceback")
    assert error_message(err.value) == message  # every line of a multi-line message, nothing of the traceback
    assert format_error(error_message(err.value)) == message


def test_worker_message_with_a_qualified_name_and_plain_messages():
    tb = ("Caught DiskFullError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
          "  File \"x.py\", line 1, in f\n    raise DiskFullError(\n        msg)\n    ^^^^^\n"
          "octa3d.errors.DiskFullError: /c/k.npy: the disk is full\n  /c/k.json too\nfree some space\n")
    assert error_message(DataError(tb)) == "/c/k.npy: the disk is full\n  /c/k.json too\nfree some space"
    assert error_message(DataError("  a: b \n  c\n")) == "a: b \n  c"  # not a worker's: whole
    assert error_message(RuntimeError("Caught X elsewhere.\nOriginal Traceback")) == \
        "Caught X elsewhere.\nOriginal Traceback"
