"""A read (not a run) of a ``torch.save`` file's pickles before ``torch.load`` builds anything.

``torch.load(weights_only=True)`` runs no code from a file, but it still builds whatever containers the
pickle describes, and building a dict hashes its keys. A key that nests a tuple in itself 64 times
(a 1-KB file) takes 2^64 steps to hash, and 100,000 integer keys that differ by 2^61 - 1 hash alike
(each insertion compares with all before it); both hang the loader. No checkpoint, weights file or
training state that hypertriton reads keys a dict by anything but a name or an integer (below 2^61 - 1),
so anything else is refused here, before loading, with the file named.

The pickle read is the one ``torch.load`` unpickles: a zip file's ``data.pkl`` as PyTorch's own zip reader
gives it (Python's ``zipfile`` refuses files that PyTorch reads, such as those saved without CRCs), and
a legacy file's pickles in order, from the handle then given to ``torch.load`` (no second opening).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from typing import BinaryIO

from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # torch's unpickler renames Python 2 globals by these

__all__ = ["UnsafeFileError", "check_torch_file"]

# Integers below this hash to themselves (CPython's hash of an int is its value mod 2^61 - 1), so no two
# such keys collide (-1 and -2 aside).
_DISTINCT_HASH_LIMIT = 2**61 - 1
# Constructors that hash what they are given; a pickle calls them with no argument (then fills them with
# SETITEMS, whose keys are checked) or, for Counter, with a dict (whose keys were checked when it was built).
_HASHING_CONSTRUCTORS = {"builtins.set", "builtins.frozenset", "builtins.dict", "collections.OrderedDict",
                         "collections.Counter", "collections.defaultdict"}
# A legacy (non-zip) torch file starts with five pickles: magic number, protocol version, system info,
# the saved object and its storages' keys; the storages' raw bytes follow.
_LEGACY_PICKLES = 5
_ZIP_MAGIC = b"PK\x03\x04"


class UnsafeFileError(ValueError):
    """A ``torch.save`` file whose pickle would make loading it take forever."""


# How a refusal names what a key is.
_KIND_WORDS = {"tuple": "a tuple", "frozenset": "a frozenset", "float": "a float", "bytes": "bytes", "None": "None",
               "list": "a list", "dict": "a dict", "set": "a set", "global": "a class or function"}


def _key_problem(entry: tuple) -> str | None:
    kind, value = entry
    if kind in ("str", "bytes_or_str"):  # bytes_or_str: Python 2's strings, read by torch as str
        return None
    if kind in ("int", "bool") and isinstance(value, int) and abs(value) < _DISTINCT_HASH_LIMIT:
        return None
    if kind == "int":
        return f"an integer of {abs(value).bit_length()} bits" if isinstance(value, int) else "an integer"
    return _KIND_WORDS.get(kind, "an object the file builds")


def _global_name(module: str, name: str) -> str:
    """``module.name`` as torch's unpickler resolves it (``__builtin__ set`` is ``builtins.set``)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


# A tuple is hashed through all the tuples it holds (as a dict key, a set item, or wherever torch's loader
# looks something up: a storage key, a layout's name): more than this many, unfolded, or deeper than this,
# is no checkpoint's (a storage key is a flat tuple; a tensor's size a tuple of ints) and is refused, where
# it could hash for hours (a tuple holding its child twice, 64 times over) or overflow the C stack.
_TUPLE_UNFOLDED_LIMIT = 100_000
_TUPLE_DEPTH_LIMIT = 32
_SCALAR_KINDS = ("str", "bytes_or_str", "int", "bool", "None", "float")


def _check_pickle(stream, where: str, keys_only: bool = False) -> None:
    """Follow one pickle's stack by kind of object (nothing is built), up to its STOP. ``keys_only``: the
    pickle is a legacy file's list of storage keys, which torch looks up one by one: strings or integers.

    An entry is ``(kind, value)``: a string's or integer's value, a global's name, a hashing constructor's
    name for what it built (``"built"``), and for a tuple ``(items, unfolded size, depth)``, its items as
    ``(kind, value)`` with any tuple among them reduced to ``("tuple", its depth)``.
    """
    stack: list[tuple] = []
    marks: list[int] = []
    memo: dict = {}

    def refuse(problem: str, what: str = "keys a dict by") -> UnsafeFileError:
        return UnsafeFileError(f"{where} {what} {problem}; checkpoints key their entries by name (such keys let "
                               "a small file make loading hash for hours), so it is not loaded")

    def checked(items: list[tuple]) -> list[tuple]:
        # A set, Counter or OrderedDict constructor handed on (to torch's _rebuild_from_type_v2, say) would be
        # called on items this check never sees: only a REDUCE may call one, on what it checks below.
        for kind, value in items:
            if kind == "global" and value in _HASHING_CONSTRUCTORS:
                raise UnsafeFileError(f"{where} passes {value} on to be called elsewhere, on items it would hash "
                                      "unchecked; checkpoints never do, so it is not loaded")
        return items

    def pop_to_mark() -> list[tuple]:
        start = marks.pop() if marks else 0
        items = stack[start:]
        del stack[start:]
        return checked(items)

    def pop(count: int) -> list[tuple]:
        items = stack[len(stack) - count:] if count else []
        del stack[len(stack) - count:]
        return checked(items)

    def make_tuple(items: list[tuple]) -> tuple:
        nested = [value for kind, value in items if kind == "tuple"]
        size = 1 + sum(unfolded for _, unfolded, _ in nested)
        depth = 1 + max((deep for _, _, deep in nested), default=0)
        if size > _TUPLE_UNFOLDED_LIMIT or depth > _TUPLE_DEPTH_LIMIT:
            raise UnsafeFileError(f"{where} builds a tuple {depth} deep, of {size} tuples unfolded; no checkpoint "
                                  "holds one, and hashing it, as loading may, could take hours, so it is not loaded")
        light = tuple(("tuple", value[2]) if kind == "tuple" else (kind, value) for kind, value in items)
        return ("tuple", (light, size, depth))

    for opcode, argument, _position in pickletools.genops(stream):
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
            stack.append(("global", _global_name(*argument.split(" ", 1))))
        elif name == "STACK_GLOBAL":
            module, qualified = pop(2)
            stack.append(("global", _global_name(str(module[1]), str(qualified[1]))))
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
                    raise refuse(problem, "fills a set with")
            if name == "FROZENSET":
                stack.append(("frozenset", None))
        elif name in ("EMPTY_LIST", "LIST"):
            items = pop_to_mark() if name == "LIST" else []
            # whether every item could be a key: the box is shared with the memo, so later appends count
            stack.append(("list", {"keys": all(_key_problem(item) is None for item in items)}))
        elif name in ("APPEND", "APPENDS"):
            items = pop(1) if name == "APPEND" else pop_to_mark()
            problems = [problem for item in items if (problem := _key_problem(item)) is not None]
            if keys_only and problems:
                raise refuse(problems[0], "lists as a storage key")
            if problems and stack and stack[-1][0] == "list":
                stack[-1][1]["keys"] = False
        elif name in ("REDUCE", "NEWOBJ"):
            arguments = pop(1)[0]
            function = stack.pop() if stack else ("other", None)  # the one place a constructor may be
            if function[0] == "global" and function[1] in _HASHING_CONSTRUCTORS:
                # from dicts (keys checked when built) or lists of what could be keys (a set of names)
                given = arguments[1][0] if arguments[0] == "tuple" else None
                if given is None or not all(kind == "dict" or (kind == "list" and value["keys"])
                                            for kind, value in given):
                    raise UnsafeFileError(f"{where} builds a {function[1]} from items that would be hashed "
                                          "unchecked; checkpoints build their dicts entry by entry, so it is not "
                                          "loaded")
                stack.append(("built", function[1]))
            else:
                stack.append(("other", None))
        elif name == "BUILD":
            instance, state = pop(2)
            if instance[0] == "built" and state[0] not in ("dict", "None"):
                # torch fills an OrderedDict or Counter from the state: from a dict, whose keys were checked
                raise UnsafeFileError(f"{where} fills a {instance[1]} from a {state[0]} of items that would be "
                                      "hashed unchecked; checkpoints never do, so it is not loaded")
            stack.append(instance)
        elif name == "BINPERSID":
            pid = pop(1)[0]
            # torch looks its storage key up in a dict: ("storage", type, key, location, size[, view]), the
            # legacy format's view a flat (key, offset, size).
            items = pid[1][0] if pid[0] == "tuple" else None
            if items is None or any(kind not in (*_SCALAR_KINDS, "global") and not (kind == "tuple" and index == 5
                                                                                  and value == 1)
                                    for index, (kind, value) in enumerate(items)):
                raise UnsafeFileError(f"{where} names a storage by something other than a flat tuple of names and "
                                      "numbers; torch looks it up as a key, so it is not loaded")
            stack.append(("other", None))
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            count = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}.get(name)
            stack.append(make_tuple(pop_to_mark() if count is None else pop(count)))
        elif name == "STOP":
            return
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


def check_torch_file(handle: BinaryIO, name: str) -> None:
    """Refuse a ``torch.save`` file (zip or legacy format), open as ``handle``, whose pickles key a dict
    by anything but a string or an integer below 2^61 - 1, or fill a set, dict or Counter from unchecked
    items. ``handle`` is left where it was.

    A file that is no torch file at all passes (``torch.load`` says what it is); one whose pickle is read
    but cannot be followed to its end is refused.

    Raises:
        UnsafeFileError: naming the file (``name``) and the offending key.
    """
    start = handle.tell()
    try:
        zipped = handle.read(4) == _ZIP_MAGIC
        handle.seek(start)
        if zipped:
            data = _zip_data_pickle(handle, name)
            if data is not None:
                _check_strictly(io.BytesIO(data), f"{name!r} (its data.pkl)")
            return
        try:  # the magic number: a file that does not start with a pickle is no legacy torch file
            _check_pickle(handle, repr(name))
        except (ValueError, EOFError, IndexError, KeyError, TypeError):
            return
        for index in range(1, _LEGACY_PICKLES):
            _check_strictly(handle, repr(name), keys_only=index == _LEGACY_PICKLES - 1)
    finally:
        handle.seek(start)


def _check_strictly(stream, where: str, keys_only: bool = False) -> None:
    try:
        _check_pickle(stream, where, keys_only)
    except UnsafeFileError:
        raise
    except Exception as error:  # what torch.load would unpickle, unreadable to the check: not loaded unchecked
        raise UnsafeFileError(f"{where}: its pickle cannot be followed to its end ({type(error).__name__}: "
                              f"{error}), so it is not loaded") from None


def _zip_data_pickle(handle: BinaryIO, name: str) -> bytes | None:
    """The ``data.pkl`` record that ``torch.load`` unpickles, read by PyTorch's zip reader (None where that
    reader cannot read the file: ``torch.load`` then fails the same way)."""
    try:
        import torch

        reader = torch._C.PyTorchFileReader(handle)
    except AttributeError:  # no such reader in this torch: Python's zipfile, refusing what it cannot read
        try:
            with zipfile.ZipFile(handle) as archive:
                records = [r for r in archive.infolist() if r.filename.rsplit("/", 1)[-1] == "data.pkl"]
                return archive.read(records[0]) if records else None
        except (zipfile.BadZipFile, OSError) as error:
            raise UnsafeFileError(f"{name!r}: its zip archive cannot be read to check it ({error}), so it is not "
                                  "loaded") from None
    except Exception:  # not a zip archive PyTorch can read: torch.load says so
        return None
    try:
        return reader.get_record("data.pkl")
    except Exception:  # no data.pkl (a TorchScript archive, say): torch.load says what it is
        return None
