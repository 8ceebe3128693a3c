"""A read (not a run) of a ``torch.save`` file's pickles before ``torch.load`` builds anything.

``torch.load(weights_only=True)`` runs no code from a file, but it still builds whatever containers the
pickle describes, and building a dict hashes its keys. A key that nests a tuple in itself 64 times
(a 1-KB file) takes 2^64 steps to hash, and 100,000 integer keys that differ by 2^61 - 1 hash alike
(each insertion compares with all before it); both hang the loader. No checkpoint, weights file or
training state that hypertriton reads keys a dict by anything but a name or a small integer, so
anything else is refused here, before loading, with the file named.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from pathlib import Path

__all__ = ["UnsafeFileError", "check_torch_file"]

# Integers below this hash to themselves (CPython's hash of an int is its value mod 2^61 - 1), so no two
# such keys collide (-1 and -2 aside).
_DISTINCT_HASH_LIMIT = 2**61 - 1
# Constructors that hash what they are given; a pickle calls them with no argument (then fills them with
# SETITEMS, whose keys are checked) or, for Counter, with a dict (whose keys were checked when it was built).
_HASHING_CONSTRUCTORS = {"builtins.set", "builtins.frozenset", "builtins.dict", "collections.OrderedDict",
                         "collections.Counter"}
# A legacy (non-zip) torch file starts with five pickles: magic number, protocol version, system info,
# the saved object and its storages' keys; the storages' raw bytes follow.
_LEGACY_PICKLES = 5
_ZIP_MAGIC = b"PK\x03\x04"


class UnsafeFileError(ValueError):
    """A ``torch.save`` file whose pickle would make loading it take forever."""


def _key_problem(entry: tuple) -> str | None:
    kind, value = entry
    if kind == "str":
        return None
    if kind in ("int", "bool") and isinstance(value, int) and abs(value) < _DISTINCT_HASH_LIMIT:
        return None
    if kind == "int":
        return f"an integer of {abs(value).bit_length()} bits" if isinstance(value, int) else "an integer"
    return {"any": "an object the file builds", "None": "None"}.get(kind, f"a {kind}")


def _check_pickle(stream, where: str) -> bool:
    """Follow one pickle's stack by kind of object (nothing is built). False at the end of the stream."""
    stack: list[tuple] = []
    marks: list[int] = []
    memo: dict = {}
    seen_any = False

    def pop_to_mark() -> list[tuple]:
        start = marks.pop() if marks else 0
        items = stack[start:]
        del stack[start:]
        return items

    def pop(count: int) -> list[tuple]:
        items = stack[len(stack) - count:] if count else []
        del stack[len(stack) - count:]
        return items

    def refuse(problem: str) -> UnsafeFileError:
        return UnsafeFileError(f"{where} keys a dict by {problem}; checkpoints key their entries by name (such "
                               "keys let a small file make loading hash for hours), so it is not loaded")

    for opcode, argument, _position in pickletools.genops(stream):
        seen_any = True
        name = opcode.name
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if stack:
                memo[argument] = stack[-1]
        elif name == "MEMOIZE":
            if stack:
                memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(argument, ("other", None)))
        elif name == "DUP":
            stack.append(stack[-1] if stack else ("other", None))
        elif name == "GLOBAL":
            stack.append(("global", argument.replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            module, qualified = pop(2)
            stack.append(("global", f"{module[1]}.{qualified[1]}"))
        elif name == "SETITEM":
            key = pop(2)[0]
            if (problem := _key_problem(key)) is not None:
                raise refuse(problem)
        elif name in ("SETITEMS", "DICT"):
            items = pop_to_mark()
            for key in items[0::2]:
                if (problem := _key_problem(key)) is not None:
                    raise refuse(problem)
            if name == "DICT":
                stack.append(("dict", None))
        elif name in ("ADDITEMS", "FROZENSET"):
            for item in pop_to_mark():
                if (problem := _key_problem(item)) is not None:
                    raise refuse(problem)
            if name == "FROZENSET":
                stack.append(("frozenset", None))
        elif name in ("REDUCE", "NEWOBJ"):
            function, arguments = pop(2)
            if function[0] == "global" and function[1] in _HASHING_CONSTRUCTORS:
                given = arguments[1] if arguments[0] == "tuple" else None
                if given is None or any(kind != "dict" for kind in given):
                    raise UnsafeFileError(f"{where} calls {function[1]} with arguments it would hash unchecked; "
                                          "checkpoints build dicts from names, so it is not loaded")
            stack.append(("other", None))
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            count = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}.get(name)
            items = pop_to_mark() if count is None else pop(count)
            stack.append(("tuple", tuple(kind for kind, _ in items)))  # kinds only: nothing nests here
        elif name == "STOP":
            return True
        else:  # every other opcode by its documented stack effect
            before = [item.name for item in opcode.stack_before]
            if "mark" in before:
                pop_to_mark()
                pop(before.index("mark"))
            else:
                pop(len(before))
            for produced in opcode.stack_after:
                kind = produced.name
                if kind in ("int", "int_or_bool"):
                    stack.append(("int", argument))
                elif kind == "str":
                    stack.append((kind, argument))
                elif kind == "bool":
                    stack.append((kind, name == "NEWTRUE"))
                else:
                    stack.append((kind, None))
    return seen_any


def check_torch_file(path: str | os.PathLike) -> None:
    """Refuse a ``torch.save`` file (zip or legacy format) whose pickles key a dict by anything but a
    string or an integer below 2^61 - 1, or fill a set, dict or Counter from unchecked items.

    Files that are not pickles at all, or are malformed, pass: ``torch.load`` says what is wrong with them.

    Raises:
        UnsafeFileError: naming the file and the offending key.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            zipped = handle.read(4) == _ZIP_MAGIC
            if not zipped:
                handle.seek(0)
                for _ in range(_LEGACY_PICKLES):
                    if not _check_pickle(handle, f"{str(path)!r}"):
                        break
                return
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.filename.endswith(".pkl"):
                    with archive.open(record) as pickled:
                        _check_pickle(pickled, f"{str(path)!r} (its {record.filename})")
    except UnsafeFileError:
        raise
    except Exception:  # not a pickle, a damaged zip, a short file: torch.load's own error says it better
        return
