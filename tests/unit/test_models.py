import pytest
import torch

from plasticity.config import ModelConfig
from plasticity.models import adapter_for, load_model
from plasticity.models.loading import ModelUnavailableError
from plasticity.models.presets import TINY_PRESETS
from plasticity.steering.forward import encode_left_padded, forward
from plasticity.steering.hooks import capture, hook_name

ARCH = {"tiny-gpt2": "gpt2", "tiny-biogpt": "biogpt", "tiny-llama": "llama", "tiny-gpt-neox": "gpt_neox"}


@pytest.fixture(scope="module", params=TINY_PRESETS)
def tiny(request):
    return request.param, load_model(ModelConfig(source=request.param))


def test_tiny_presets_have_the_architecture_and_gpt2_vocabulary(tiny):
    name, lm = tiny
    assert lm.model.config.model_type == ARCH[name]
    assert lm.n_layers == 4 and lm.d_model == 64
    assert len(lm.tokenizer) == 50257
    assert lm.tokenizer(" True")["input_ids"] == [6407]  # the real GPT-2 BPE
    assert lm.adapter.unembedding_matrix(lm.model).shape == (50257, 64)


def test_tiny_presets_are_seeded():
    a = load_model(ModelConfig(source="tiny-llama", seed=3)).model.state_dict()
    b = load_model(ModelConfig(source="tiny-llama", seed=3)).model.state_dict()
    c = load_model(ModelConfig(source="tiny-llama", seed=4)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_left_padding_does_not_change_the_last_token(tiny):
    _, lm = tiny
    prompts = ["The cat sat on the mat and looked", "Hello"]
    with capture(lm, [0, 3]) as store:
        forward(lm, encode_left_padded(lm, prompts))
        batched = store[hook_name(3)][:, -1].clone()
        for i, p in enumerate(prompts):
            forward(lm, encode_left_padded(lm, [p]))
            torch.testing.assert_close(batched[i], store[hook_name(3)][0, -1], rtol=1e-5, atol=1e-5)


def test_final_block_plus_norm_and_unembedding_gives_the_logits(tiny):
    # The adapter's blocks, final norm and unembedding reproduce the model's own logits.
    _, lm = tiny
    enc = encode_left_padded(lm, ["Paris is the capital of"])
    with capture(lm, [lm.n_layers - 1]) as store:
        logits = forward(lm, enc, logits_to_keep=0).logits
        h = store[hook_name(lm.n_layers - 1)]
    ours = lm.adapter.norm(lm.model)(h) @ lm.adapter.unembedding_matrix(lm.model).T
    scale = getattr(lm.model.config, "scale_embedding", False)
    assert not scale or lm.model.config.model_type == "biogpt"
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="no architecture adapter for model_type 'bert'"):
        adapter_for("bert")


def test_hub_id_offline_suggests_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as exc:
        load_model(ModelConfig(source="nobody/no-such-model"))
    msg = str(exc.value)
    assert "nobody/no-such-model" in msg and "local folder" in msg and "HF_HUB_OFFLINE" in msg


def test_local_folder_source_round_trips(tmp_path, tiny_gpt2):
    tiny_gpt2.model.save_pretrained(tmp_path)
    tiny_gpt2.tokenizer.save_pretrained(tmp_path)
    lm = load_model(ModelConfig(source=str(tmp_path)))
    ids = torch.tensor([[464, 3797, 3332]])
    torch.testing.assert_close(lm.model(ids).logits, tiny_gpt2.model(ids).logits)


def test_smollm2_preset_is_the_real_pretrained_model():
    pytest.importorskip("gguf")
    lm = load_model(ModelConfig(source="smollm2-135m"))
    assert lm.model.config.model_type == "llama"
    assert lm.n_layers == 30 and lm.d_model == 576
    enc = lm.tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    out = lm.model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
