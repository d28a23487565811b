import shutil

import httpx2
import pytest
import torch
from huggingface_hub.errors import GatedRepoError

from pipecat_orpheus import loader
from pipecat_orpheus.config import ModelConfig
from pipecat_orpheus.errors import ConfigError, ModelLoadError
from pipecat_orpheus.format import END_OF_SPEECH, VOCAB_SIZE


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def llm_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "llm"
    shutil.copytree(tiny_model_dir / "llm", dst)
    return dst


@pytest.fixture
def snac_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "snac"
    shutil.copytree(tiny_model_dir / "snac", dst)
    return dst


def test_load_llm_from_local_dir_offline(tiny_model_dir, offline):
    """A local directory loads with the hub offline: eval-mode Llama with Orpheus's vocabulary and tokenizer."""
    llm, tok = loader.load_llm(str(tiny_model_dir / "llm"), dtype=torch.float32, device="cpu")
    assert not llm.training and llm.config.vocab_size == VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<custom_token_2>") == END_OF_SPEECH
    assert next(llm.parameters()).dtype == torch.float32


def test_load_snac_from_local_dir_offline(tiny_model_dir, offline):
    """SNAC loads from a local directory (config.json + pytorch_model.bin) and decodes one frame to 2048 samples."""
    snac = loader.load_snac(str(tiny_model_dir / "snac"), device="cpu")
    assert not snac.training
    codes = [torch.zeros(1, n, dtype=torch.long) for n in (1, 2, 4)]
    with torch.inference_mode():
        audio = snac.decode(codes)
    assert audio.shape == (1, 1, 2048)


def test_load_snac_from_safetensors(snac_copy, offline):
    """A SNAC directory with model.safetensors instead of pytorch_model.bin loads the same weights."""
    from safetensors.torch import save_file

    state = torch.load(snac_copy / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snac_copy / "model.safetensors")
    (snac_copy / "pytorch_model.bin").unlink()
    snac = loader.load_snac(str(snac_copy), device="cpu")
    key = next(iter(state))
    assert torch.equal(snac.state_dict()[key], state[key])


def test_missing_path_fails_clearly(tmp_path):
    """A path that does not exist fails with ModelLoadError naming it, without touching the hub."""
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a directory"):
        loader.load_llm(missing, dtype=torch.float32, device="cpu")
    with pytest.raises(ModelLoadError, match="nope"):
        loader.load_snac(missing, device="cpu")


def test_corrupt_llm_config(llm_copy):
    """A corrupt config.json becomes a ModelLoadError, not a traceback from transformers."""
    (llm_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model.llm"):
        loader.load_llm(str(llm_copy), dtype=torch.float32, device="cpu")


def test_missing_llm_weights(llm_copy):
    """A checkpoint directory without weights fails with ModelLoadError."""
    (llm_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="weights"):
        loader.load_llm(str(llm_copy), dtype=torch.float32, device="cpu")


def test_missing_snac_weights(snac_copy):
    """A SNAC directory without weights names the files it needs."""
    (snac_copy / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        loader.load_snac(str(snac_copy), device="cpu")


def test_corrupt_snac_files(snac_copy):
    """A corrupt SNAC config or truncated weights file fails with ModelLoadError."""
    (snac_copy / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        loader.load_snac(str(snac_copy), device="cpu")
    (snac_copy / "config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="not a valid SNAC config"):
        loader.load_snac(str(snac_copy), device="cpu")


def test_not_an_orpheus_checkpoint(tmp_path, tiny_model_dir):
    """A Llama with a smaller vocabulary is refused as not Orpheus."""
    from transformers import LlamaForCausalLM

    from pipecat_orpheus.testing import make_tiny_tokenizer, tiny_llama_config

    path = tmp_path / "small"
    LlamaForCausalLM(tiny_llama_config(vocab_size=1000)).save_pretrained(path)
    make_tiny_tokenizer(path)
    with pytest.raises(ModelLoadError, match="not an Orpheus checkpoint"):
        loader.load_llm(str(path), dtype=torch.float32, device="cpu")


def test_gated_hub_id_offline_names_hf_token(offline):
    """A hub id that is not cached, offline, says to set HF_TOKEN, accept the licence, or pass a local path."""
    with pytest.raises(ModelLoadError) as info:
        loader.load_llm("canopylabs/orpheus-3b-0.1-ft", dtype=torch.float32, device="cpu")
    msg = str(info.value)
    assert "HF_TOKEN" in msg and "https://huggingface.co/canopylabs/orpheus-3b-0.1-ft" in msg
    assert "local" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ModelLoadError, match="HF_TOKEN"):
        loader.load_snac("hubertsiuzdak/snac_24khz", device="cpu")


def test_gated_repo_error_translated(monkeypatch):
    """huggingface_hub's GatedRepoError becomes advice to accept the licence and set HF_TOKEN."""
    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/owner/gated"))

    def gated(*args, **kwargs):
        raise GatedRepoError("gated", response=response)

    monkeypatch.setattr("huggingface_hub.snapshot_download", gated)
    with pytest.raises(ModelLoadError, match="gated: accept the licence at https://huggingface.co/owner/gated"):
        loader.load_llm("owner/gated", dtype=torch.float32, device="cpu")


def test_invalid_hub_id():
    """A name that is neither a directory nor a valid hub id says so."""
    with pytest.raises(ModelLoadError, match="neither an existing local directory nor a valid hub id"):
        loader.load_llm("bad id!!", dtype=torch.float32, device="cpu")


def test_resolve_device_and_dtype(monkeypatch):
    """auto picks cuda only when present; cuda without CUDA tells the user to use cpu; dtype auto follows device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader.resolve_device(ModelConfig(device="auto")) == torch.device("cpu")
    assert loader.resolve_device(ModelConfig(device="cpu")) == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="device: cpu"):
        loader.resolve_device(ModelConfig(device="cuda"))
    with pytest.raises(ConfigError, match="model.device"):
        loader.resolve_device(ModelConfig(device="potato"))
    assert loader.resolve_dtype(ModelConfig(), torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype(ModelConfig(), torch.device("cuda")) == torch.bfloat16
    assert loader.resolve_dtype(ModelConfig(dtype="float16"), torch.device("cpu")) == torch.float16


def test_truncated_llm_weights(llm_copy):
    """A truncated safetensors file becomes a ModelLoadError."""
    weights = llm_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="weights"):
        loader.load_llm(str(llm_copy), dtype=torch.float32, device="cpu")
