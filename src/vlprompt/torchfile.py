"""Read the tensors of a ``torch.save`` / TorchScript file without executing anything it names.

``torch.load`` unpickles: every class the file names is looked up and called (its ``__setstate__``,
its constructor), which is how a checkpoint runs code.  Official prompt-learning checkpoints name
Dassl's warm-up scheduler, torch optimizers and builtins; OpenAI's CLIP archives are TorchScript,
whose own classes run while loading.  This reader resolves only what makes tensors:

* the storages (``persistent_load``) -- read as raw bytes from the archive's ``data/<key>`` entries
  (zip format, torch >= 1.6, also TorchScript) or after the pickles (the legacy format);
* torch's tensor rebuild functions (``_rebuild_tensor_v2``, ``_rebuild_parameter`` ...), replaced by
  our own that only view those bytes with the recorded dtype, shape and strides;
* plain containers (``collections.OrderedDict``).

Every other global -- schedulers, optimizers, ``builtins.*``, numpy scalars, ``__torch__`` classes --
becomes a :class:`Stub` that records its name, arguments and state and runs nothing; no attribute of
the file is ever called.  Memory is bounded before allocation: the bytes the tensors declare may not
exceed the file's size (``torch.save`` stores them uncompressed), so a compressed "bomb" is refused
before it is inflated.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vlprompt.errors import VlpromptError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


class Stub:
    """Stands in for anything the file names that is not a tensor: records, never runs."""

    stub_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        self = object.__new__(cls)
        self.__dict__["args"] = args
        self.__dict__["state"] = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a stubbed dict type
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) on a stubbed list type
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<stub {self.stub_name}>"


class _StorageType:
    """A ``torch.XxxStorage`` global: only its dtype is used."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


class _Storage:
    """A storage the pickle references; its bytes are filled in after the sizes were checked."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel
        self.flat: torch.Tensor | None = None


class _PendingTensor:
    """A tensor whose storage is not read yet (the legacy format stores bytes after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(i) is int and i >= 0 for i in x):
        raise _Bad(f"tensor {what} {x!r} is not a tuple of non-negative integers")
    return tuple(x)


class _Bad(Exception):
    pass


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
    if not isinstance(storage, _Storage):
        raise _Bad("a tensor refers to something that is not a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise _Bad("tensor offset/size/stride are malformed")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise _Bad(f"a tensor reaches element {last} of a storage of {storage.numel}")
    return _PendingTensor(storage, offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):  # noqa: ANN001
    return _rebuild(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func in (_rebuild, _rebuild_v3, _rebuild_parameter) and isinstance(args, tuple):
        return func(*args)
    return Stub()


_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): OrderedDict,
}


class _Unpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD can be replaced
    """Resolves tensor rebuilds and storages; every other global is a :class:`Stub`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, storage: Callable[[tuple], _Storage]) -> None:
        super().__init__(file, encoding="latin1")
        self._storage = storage
        self.stub_names: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 (Python 2) spellings
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        fn = _FUNCTIONS.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in _DTYPES:
            return _StorageType(name, _DTYPES[name])
        full = f"{module}.{name}"
        self.stub_names.add(full)
        return type(name, (Stub,), {"stub_name": full, "__module__": "vlprompt.torchfile"})

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise _Bad(f"unknown persistent id {str(pid)[:60]}")
        return self._storage(pid)

    def load_build(self) -> None:  # BUILD: record the state on a stub, never call __setstate__
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Stub):
            inst.__dict__["state"] = state

    dispatch[pickle.BUILD[0]] = load_build

    def load_reduce(self) -> None:  # REDUCE: only our own functions and stubs are callable
        args = self.stack.pop()
        func = self.stack[-1]
        if not (func in _FUNCTIONS.values() or (isinstance(func, type) and issubclass(func, Stub))):
            raise _Bad(f"the file calls {type(func).__name__}, which is not a known constructor")
        self.stack[-1] = func(*args) if isinstance(args, tuple) else Stub()

    dispatch[pickle.REDUCE[0]] = load_reduce


class TorchFileError(VlpromptError):
    """The file cannot be read as tensors; ``reason`` is the part without the path (callers rephrase)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read {path} as a torch file: {reason}")
        self.reason = reason


def _too_big(path: Path, declared: int, size: int) -> TorchFileError:
    return TorchFileError(
        path,
        f"it declares {declared / 2**20:.1f} MiB of tensors in a {size / 2**20:.1f} MiB file (compressed "
        "or damaged; torch.save stores tensors uncompressed), refused before inflating it",
    )


def _materialise(obj: Any, seen: dict[int, Any] | None = None, depth: int = 0) -> Any:
    """Replace pending tensors by real ones, in containers and stub states."""
    if depth > 200:
        raise _Bad("the object nests deeper than 200 levels")
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _PendingTensor):
        flat = obj.storage.flat
        assert flat is not None
        t = flat.as_strided(obj.size, obj.stride, obj.offset) if obj.size else flat[obj.offset].clone()
        seen[id(obj)] = t
        return t
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for k in list(obj):
            obj[k] = _materialise(obj[k], seen, depth + 1)
        return obj
    if isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_materialise(v, seen, depth + 1) for v in obj]
        return obj
    if isinstance(obj, tuple):
        out = tuple(_materialise(v, seen, depth + 1) for v in obj)
        seen[id(obj)] = out
        return out
    if isinstance(obj, Stub):
        seen[id(obj)] = obj
        obj.__dict__["args"] = _materialise(obj.args, seen, depth + 1)
        for k in ("state", "items", "list"):
            if k in obj.__dict__:
                obj.__dict__[k] = _materialise(obj.__dict__[k], seen, depth + 1)
        return obj
    return obj


class TorchFile:
    """What :func:`read` found: the unpickled object, the stubbed global names, the archive's entries."""

    def __init__(self, obj: Any, stubs: set[str], entries: list[str], fmt: str) -> None:
        self.obj, self.stubs, self.entries, self.format = obj, stubs, entries, fmt

    @property
    def torchscript(self) -> bool:
        return any(e.endswith("constants.pkl") for e in self.entries)


def read(path: str | os.PathLike, pickle_name: str = "data.pkl") -> TorchFile:
    """Read a ``torch.save`` file (zip or legacy) or a TorchScript archive, tensors only."""
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            return _read_zip(p, pickle_name)
        return _read_legacy(p)
    except VlpromptError:
        raise
    except Exception as e:  # noqa: BLE001 -- anything a damaged or hostile pickle can raise
        what = "damaged" if isinstance(e, _Bad) else type(e).__name__
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else "-"
        raise TorchFileError(p, f"{what}: {first}") from None


def _read_zip(p: Path, pickle_name: str) -> TorchFile:
    size = p.stat().st_size
    with zipfile.ZipFile(p) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for i in infos.values():
            if i.file_size > size:
                raise _too_big(p, i.file_size, size)
        pkl = [n for n in infos if n == pickle_name or n.endswith("/" + pickle_name)]
        if not pkl:
            raise TorchFileError(p, f"a zip file without {pickle_name}, not a torch.save file")
        prefix = pkl[0][: -len(pickle_name)]
        order = infos.get(prefix + "byteorder")
        if order is not None and zf.read(order).strip() not in (b"little", b""):
            raise TorchFileError(p, "saved on a big-endian machine; re-save it on a little-endian one")
        storages: dict[str, tuple[_Storage, str]] = {}

        def storage(pid: tuple) -> _Storage:
            _, stype, key, _location, numel = pid[:5]
            dtype = stype.dtype if isinstance(stype, _StorageType) else None
            if dtype is None or type(numel) is not int or numel < 0:
                raise _Bad(f"storage {key!r} has no known dtype or size")
            key = str(key)
            if key not in storages:
                entry = next(
                    (
                        n
                        for n in (f"{prefix}data/{key}", f"{prefix}{key}", f"{prefix}constants/{key}")
                        if n in infos
                    ),
                    None,
                )
                if entry is None:
                    raise _Bad(f"storage {key} is missing from the archive")
                storages[key] = (_Storage(dtype, numel), entry)
            return storages[key][0]

        with zf.open(infos[pkl[0]]) as f:
            up = _Unpickler(io.BytesIO(f.read(infos[pkl[0]].file_size)), storage)
            obj = up.load()
        declared = sum(s.numel * _itemsize(s.dtype) for s, _ in storages.values())
        if declared > size:
            raise _too_big(p, declared, size)
        for s, entry in storages.values():
            nbytes = s.numel * _itemsize(s.dtype)
            if infos[entry].file_size < nbytes:
                raise _Bad(f"storage {entry} holds {infos[entry].file_size} bytes, the pickle needs {nbytes}")
            with zf.open(infos[entry]) as f:
                s.flat = _flat(f, nbytes, s)
        return TorchFile(_materialise(obj), up.stub_names, list(infos), "zip")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _flat(f: BinaryIO, nbytes: int, s: _Storage) -> torch.Tensor:
    """``nbytes`` read straight into one buffer (no second copy) and viewed as the storage's dtype."""
    if nbytes != s.numel * _itemsize(s.dtype):
        raise _Bad("a storage's size does not match its element count")
    if not nbytes:
        return torch.empty(0, dtype=s.dtype)
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise _Bad("a storage is truncated")
        got += n
    return torch.frombuffer(buf, dtype=s.dtype)


def _read_legacy(p: Path) -> TorchFile:
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80:
            raise TorchFileError(p, "neither a zip nor a legacy torch.save file")
        f.seek(0)
        for expect in (_LEGACY_MAGIC, _LEGACY_PROTOCOL):
            if _Unpickler(f, _no_storage).load() != expect:
                raise TorchFileError(p, "not a torch.save file (wrong magic number or protocol)")
        info = _Unpickler(f, _no_storage).load()
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise TorchFileError(p, "saved on a big-endian machine; re-save it on a little-endian one")
        roots: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}

        def storage(pid: tuple) -> _Storage:
            if len(pid) == 5:
                pid = (*pid, None)
            _, stype, key, _location, numel, view = pid[:6]
            dtype = stype.dtype if isinstance(stype, _StorageType) else None
            if dtype is None or type(numel) is not int or numel < 0:
                raise _Bad(f"storage {key!r} has no known dtype or size")
            key = str(key)
            root = roots.setdefault(key, _Storage(dtype, numel))
            if view is None:
                return root
            vkey, offset, vsize = view
            if str(vkey) not in views:
                v = _Storage(dtype, int(vsize))
                v.view_of = (root, int(offset))  # type: ignore[attr-defined]
                views[str(vkey)] = v
            return views[str(vkey)]

        up = _Unpickler(f, storage)
        obj = up.load()
        keys = _Unpickler(f, _no_storage).load()
        if not isinstance(keys, list) or any(str(k) not in roots for k in keys):
            raise _Bad("the storage key list does not match the pickle")
        declared = sum(s.numel * _itemsize(s.dtype) for s in roots.values())
        if declared > size:
            raise _too_big(p, declared, size)
        for k in keys:
            s = roots[str(k)]
            (n,) = struct.unpack("<q", f.read(8))
            if n != s.numel:
                raise _Bad(f"storage {k} holds {n} elements, the pickle says {s.numel}")
            s.flat = _flat(f, n * _itemsize(s.dtype), s)
        for v in views.values():
            root, off = v.view_of  # type: ignore[attr-defined]
            if root.flat is None or off + v.numel > root.numel:
                raise _Bad("a storage view reaches past its storage")
            v.flat = root.flat[off : off + v.numel]
        return TorchFile(_materialise(obj), up.stub_names, [], "legacy")


def _no_storage(pid: tuple) -> _Storage:
    raise _Bad("a storage outside the data pickle")


# ------------------------------------------------------------------------------------ TorchScript
_CLASS = re.compile(r"^class (\w+)\(", re.M)
_LIST = re.compile(r"^\s+__(parameters|buffers)__ = \[([^\]]*)\]", re.M)


def torchscript_state_dict(tf: TorchFile, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of a TorchScript module, read from its stubs (its code is never run).

    The parameter and buffer names of each class are read as text from the archive's ``code/``
    declarations (``__parameters__ = [...]``); only those attributes are weights.
    """
    declared = _declared_weights(Path(path))
    out: dict[str, torch.Tensor] = {}
    for name, t in _walk(tf.obj, "", declared, 0):
        out[name] = t
    return out


def _declared_weights(p: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    with zipfile.ZipFile(p) as zf:
        for info in zf.infolist():
            if "/code/__torch__" not in "/" + info.filename or not info.filename.endswith(".py"):
                continue
            if info.file_size > p.stat().st_size:
                raise _too_big(p, info.file_size, p.stat().st_size)
            text = zf.read(info).decode("utf-8", "replace")
            module = info.filename.split("code/", 1)[1][: -len(".py")].replace("/", ".")
            spans = [(m.start(), m.group(1)) for m in _CLASS.finditer(text)] + [(len(text), "")]
            for (start, cls), (end, _) in zip(spans, spans[1:]):
                names: set[str] = set()
                for m in _LIST.finditer(text, start, end):
                    names |= {n.strip().strip("\"'") for n in m.group(2).split(",") if n.strip()}
                found[f"{module}.{cls}"] = names
    return found


def _walk(
    obj: Any, prefix: str, declared: dict[str, set[str]], depth: int
) -> Iterator[tuple[str, torch.Tensor]]:
    if depth > 64 or not isinstance(obj, Stub) or not isinstance(obj.state, dict):
        return
    weights = declared.get(obj.stub_name)
    for k, v in obj.state.items():
        if isinstance(v, torch.Tensor) and (weights is None or k in weights):
            yield prefix + str(k), v
        elif isinstance(v, Stub):
            yield from _walk(v, f"{prefix}{k}.", declared, depth + 1)
