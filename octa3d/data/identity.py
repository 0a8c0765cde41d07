"""One identity for a subject, whatever its source: the normalised subject ID and patient group that the leakage
guard (:func:`octa3d.data.splits.guard`) and the "seen in training" check
(:func:`octa3d.data.splits.training_overlap`) compare.

Subjects reach these checks in two forms. Discovery names a 2D class-folder image by its path below the data root
(``CNV/CNV-6294785-1``, ``train/CNV/CNV-6294785-1``) and gives it the patient of ``--group-regex``
(``6294785``); one ``--input`` file is named by its file name (``CNV-6294785-1``) and gets the patient from the same
rule (:func:`image_group`). :class:`IdentityIndex` matches a subject against a set of subjects by

1. the normalised ID (:func:`identity_key`: whitespace, Excel's ``10001.0``, ``\\`` vs ``/``, a scan extension);
2. for an ID that is a bare file name: the file name of an ID with folders (``CNV-6294785-1`` is
   ``CNV/CNV-6294785-1``);
3. the normalised patient group (another image of the same patient).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from octa3d.data.imagefiles import natural_key, strip_ext
from octa3d.data.labels import normalise_id
from octa3d.errors import ConfigError

__all__ = ["IdentityIndex", "compile_group_regex", "identity_key", "image_group"]


def identity_key(text: object) -> str:
    """The normalised form of a subject ID or patient group.

    Stripped, Excel's float artefact removed (``10001.0`` → ``10001``), Windows separators as ``/``, and a scan
    file extension dropped (``s01.nii.gz`` → ``s01``). ``CNV/CNV-6294785-1`` keeps its folder part.
    """
    return strip_ext(normalise_id(text).replace("\\", "/").strip("/"))


def _name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def compile_group_regex(pattern: str) -> re.Pattern[str]:
    """``--group-regex`` compiled.

    Raises:
        ConfigError: the pattern is not a valid regular expression.
    """
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--group-regex {pattern!r}: invalid regular expression ({exc})") from exc


def image_group(file_name: str, group_re: re.Pattern[str]) -> str:
    """The patient group of a 2D image from its file name: the regex's first group (else its whole match), or the
    name without extension when it does not match (``CNV-13823-1.jpeg`` → ``13823`` with the default
    ``--group-regex``). Discovery of class folders and a single ``--input`` image use this same rule."""
    stem = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
    m = group_re.search(file_name)
    group = (m.group(1) if m.groups() else m.group(0)) if m else stem
    return group or stem


class IdentityIndex:
    """A set of subjects (ID → patient group) that another subject can be matched against.

    Args:
        subjects: subject ID → patient group of the subjects to match against (e.g. the training split).
        what: what these subjects are, for :meth:`reason` (e.g. ``"training/validation subject"``).
    """

    def __init__(self, subjects: Mapping[str, str], what: str = "subject") -> None:
        self.what = what
        self.ids: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.groups: dict[str, str] = {}
        for sid in sorted(subjects, key=natural_key):
            key = identity_key(sid)
            self.ids.setdefault(key, sid)
            if "/" in key:
                self.names.setdefault(_name(key), sid)
            self.groups.setdefault(identity_key(subjects[sid] or sid), sid)

    def reason(self, subject_id: str, group: str | None = None) -> str | None:
        """Why ``subject_id`` (of patient ``group``) is one of the indexed subjects, or None.

        Returns:
            A clause such as ``"10001 is a training/validation subject"``, ``"CNV-6294785-1 is training/validation
            subject CNV/CNV-6294785-1"`` or ``"CNV-6294785-2 belongs to patient group 6294785, like
            training/validation subject CNV/CNV-6294785-1"``.
        """
        key = identity_key(subject_id)
        if key in self.ids:
            other = self.ids[key]
            return f"{subject_id} is a {self.what}" if other == subject_id else f"{subject_id} is {self.what} {other}"
        if "/" not in key and key in self.names:
            return f"{subject_id} is {self.what} {self.names[key]} (same file name)"
        gkey = identity_key(group or subject_id)
        if gkey in self.groups:
            return f"{subject_id} belongs to patient group {group or subject_id}, like {self.what} {self.groups[gkey]}"
        return None

    def matches(self, subjects: Iterable[str], group_of: Mapping[str, str]) -> list[str]:
        """The IDs among ``subjects`` that match (:meth:`reason`), in natural order."""
        return sorted((s for s in set(subjects) if self.reason(s, group_of.get(s, s)) is not None), key=natural_key)

