import pytest
import torch

from plasticity.data.truthfulqa import TruthfulQAItem, load_truthfulqa
from plasticity.steering.evaluate import continuation_logprobs, truthfulqa_mc


def test_truthfulqa_is_shipped_and_parsed():
    items = load_truthfulqa()
    assert len(items) > 800
    first = items[0]
    assert first.question == "Why do veins appear blue?"
    assert first.best in first.correct
    assert all(a and a == a.strip() for a in first.correct + first.incorrect)


def _reference_logprob(lm, prompt: str, cont: str) -> float:
    """Unbatched, unpadded: the model's own loss on the continuation tokens."""
    p = lm.tokenizer(prompt)["input_ids"]
    c = lm.tokenizer(cont)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].double(), -1)
    return float(sum(logp[len(p) - 1 + i, t] for i, t in enumerate(c)))


def test_continuation_logprobs_match_an_unbatched_reference(tiny_gpt2):
    prompts = ["Q: Is the sky blue?\nA:", "Q: What is two plus two, exactly?\nA:", "Q: Hi\nA:"]
    conts = [" Yes, it is.", " Four", " Hello there my friend"]
    got = continuation_logprobs(tiny_gpt2, prompts, conts, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        assert float(got[i]) == pytest.approx(_reference_logprob(tiny_gpt2, p, c), abs=1e-4)


def test_mc1_and_mc2_follow_their_definitions(tiny_gpt2):
    item = TruthfulQAItem(
        question="Is the sky blue?", best="Yes", correct=("Yes", "Usually"), incorrect=("No", "Never", "Green")
    )
    mc1, mc2 = truthfulqa_mc(tiny_gpt2, [item, item], batch_size=3)
    prompt = "Q: Is the sky blue?\nA:"
    ll = {a: _reference_logprob(tiny_gpt2, prompt, " " + a) for a in ("Yes", "Usually", "No", "Never", "Green")}
    expected_mc1 = float(ll["Yes"] > max(ll["No"], ll["Never"], ll["Green"]))
    p = {a: torch.tensor(v, dtype=torch.float64).exp() for a, v in ll.items()}
    expected_mc2 = float((p["Yes"] + p["Usually"]) / sum(p.values()))
    assert mc1.tolist() == [expected_mc1, expected_mc1]
    assert float(mc2[0]) == pytest.approx(expected_mc2, rel=1e-4)
    assert 0.0 < float(mc2[0]) < 1.0


def test_pubmedqa_test_split_is_shipped():
    from plasticity.data.pubmedqa import MAX_CONTEXT_CHARS, load_pubmedqa

    items = load_pubmedqa("test")
    everything = load_pubmedqa("test", yes_no_only=False)
    assert len(everything) == 500 and {i.decision for i in everything} == {"yes", "no", "maybe"}
    assert len(items) == sum(i.decision != "maybe" for i in everything)
    assert all(0 < len(i.context) <= MAX_CONTEXT_CHARS and i.question for i in items)
    assert not {i.pmid for i in items} & {i.pmid for i in load_pubmedqa("train")}


def test_pubmedqa_accuracy_matches_a_manual_computation(tiny_gpt2):
    from plasticity.data.pubmedqa import load_pubmedqa
    from plasticity.steering.evaluate import pubmedqa_accuracy

    items = load_pubmedqa("test")[:3]
    got = pubmedqa_accuracy(tiny_gpt2, items, batch_size=2)
    yes, no = tiny_gpt2.tokenizer(" yes")["input_ids"][0], tiny_gpt2.tokenizer(" no")["input_ids"][0]
    for k, item in enumerate(items):
        prompt = f"Context: {item.context}\nQuestion: {item.question}\nAnswer (yes or no):"
        ids = tiny_gpt2.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = tiny_gpt2.model(ids).logits[0, -1]
        says_yes = bool(logits[yes] > logits[no])
        assert float(got[k]) == float(says_yes == (item.decision == "yes"))
