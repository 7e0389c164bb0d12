"""The lmms-eval model ``vtok_hf``: where ``loglikelihood`` scores the continuation, and what it returns, checked on
the tiny random LLaVA without lmms-eval (the requests are minimal stand-ins with lmms-eval's ``args``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from vtok.sweep import lmms_plugin as plugin

# a chat template over the tiny model's words: "a" closes the user turn, "ASSISTANT:" is the assistant header
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %} a {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass
class Req:
    """lmms-eval's ``Instance`` as the model sees it: its ``args``."""

    args: tuple


@pytest.fixture(autouse=True)
def bare_pairs(monkeypatch):
    """Plain ``(loss, greedy)`` responses even where lmms-eval is installed (its wrapping is tested on its own)."""
    monkeypatch.setattr(plugin, "GenerationResult", None)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    from vtok.hooks.hf.tiny import build_tiny_llava

    return str(build_tiny_llava(tmp_path_factory.mktemp("lmms") / "llava", image_size=112))


@pytest.fixture(params=["prompt_template", "chat_template"])
def lm(request, tiny_path) -> plugin.VtokHF:
    """The unwrapped tiny LLaVA, prompted through ``prompt_template`` or a chat template, with one image doc."""
    model = plugin.VtokHF(pretrained=tiny_path)
    if request.param == "chat_template":
        model.processor.chat_template = TEMPLATE
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    model.task_dict = {"t": {"test": [{"image": image, "target": " cat"}]}}
    return model


def to_visual(doc: dict) -> list:
    return [doc["image"]]


def request(context: str, continuation) -> Req:
    return Req((context, continuation, to_visual, 0, "t", "test"))


def seen_input_ids(lm: plugin.VtokHF, req: Req) -> tuple[list[list[int]], tuple]:
    """``(calls, response)``: the ``input_ids`` of each forward the model got for ``req``, and the plugin's answer."""
    seen = []
    hook = lambda _m, _a, kw: seen.append(kw["input_ids"][0].tolist())  # noqa: E731
    handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        [resp] = lm.loglikelihood([req])
    finally:
        handle.remove()
    return seen, resp


def word_ids(lm: plugin.VtokHF, text: str) -> list[int]:
    return lm.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_loss(lm: plugin.VtokHF, context: str, continuation: str) -> tuple[float, bool]:
    """Hugging Face's own loss (mean over the labelled tokens) × their count, on the prompt of ``context`` with
    generation header, then ``continuation``: the continuation's summed negative log-likelihood."""
    image = lm.task_dict["t"]["test"][0]["image"]
    prompt = lm.prompt(context, 1)
    inputs = lm.processor(text=[prompt + continuation], images=[image], return_tensors="pt")
    n_prompt = lm.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        out = lm.model(**inputs, labels=labels)
    m = inputs["input_ids"].shape[1] - n_prompt
    greedy = bool((out.logits[0, n_prompt - 1:-1].argmax(-1) == inputs["input_ids"][0, n_prompt:]).all())
    return float(out.loss) * m, greedy


def test_continuation_is_scored_after_the_assistant_header(lm):
    """The scored tokens are the continuation's, after the whole prompt (user turn closed, assistant header opened):
    the model sees prompt(context), then the continuation on its cache, as generation would."""
    calls, _ = seen_input_ids(lm, request("what is in the", " image ? cat"))
    prompt = lm.prompt("what is in the", 1)
    assert prompt.endswith("ASSISTANT:")  # the generation header closes the prompt
    image = lm.task_dict["t"]["test"][0]["image"]
    head = lm.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    cont = word_ids(lm, " image ? cat")
    assert len(cont) == 3 and calls == [head, cont]
    assert lm.processor.tokenizer.decode(cont) == "image ? cat"


def test_returns_the_continuation_loss_lmms_eval_minimises(lm):
    """The value is a loss: the continuation's summed negative log-likelihood (Hugging Face's labelled loss × the
    token count), positive, so lmms-eval's argmin picks the most likely choice."""
    [(loss, greedy)] = lm.loglikelihood([request("what is in the", " image ? cat")])
    ref_loss, ref_greedy = reference_loss(lm, "what is in the", " image ? cat")
    assert loss > 0 and loss == pytest.approx(ref_loss, rel=1e-4) and greedy == ref_greedy


def test_lmms_eval_argmin_picks_the_greedy_answer(lm):
    """Multiple choice as lmms-eval scores it (``np.argmin`` over the responses): the word the model finds most
    likely is chosen, and no other choice is flagged ``greedy``."""
    image = lm.task_dict["t"]["test"][0]["image"]
    inputs = lm.processor(text=[lm.prompt("what is in the image ?", 1)], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0, -1]
    tok = lm.processor.tokenizer
    best = int(logits.argmax())
    logits[tok.all_special_ids + [lm.model.config.image_token_id]] = -float("inf")  # a word, not <image> or <pad>
    word = int(logits.argmax())
    choices = list(dict.fromkeys([tok.convert_ids_to_tokens(word), "cat", "person", "photo", "left"]))
    resps = lm.loglikelihood([request("what is in the image ?", f" {c}") for c in choices])
    losses, greedy = zip(*resps, strict=True)
    assert int(np.argmin(losses)) == 0 and all(x > 0 for x in losses)
    assert list(greedy) == [word == best] + [False] * (len(choices) - 1)


def test_callable_target_and_unconditional_requests(lm):
    """lmms-eval passes its task's ``doc_to_target`` for ``loglikelihood`` tasks, and ``(context, continuation)``
    without visuals for the unconditional half of ``acc_mutual_info``."""
    by_string = lm.loglikelihood([request("what is in the", " cat")])
    by_target = lm.loglikelihood([request("what is in the", lambda doc: doc["target"])])
    assert by_target == by_string
    [(loss, _)] = lm.loglikelihood([Req(("", " cat"))])
    assert loss > 0 and loss != by_string[0][0]


def test_empty_continuation_is_refused(lm):
    with pytest.raises(ValueError, match=r"vtok_hf loglikelihood: continuation '' has no tokens"):
        lm.loglikelihood([request("what is in the", "")])


def test_responses_survive_lmms_eval_unwrapping(lm, monkeypatch):
    """With lmms-eval's ``GenerationResult`` available, each pair comes wrapped in it (its evaluator hands
    ``.text`` to the task unchanged, where it would stringify a bare tuple); without it, the bare pair."""

    @dataclass
    class GenerationResult:  # lmms-eval 0.7.3's fields
        text: str
        token_counts: object = None

    plain = lm.loglikelihood([request("what is in the", " cat")])
    monkeypatch.setattr(plugin, "GenerationResult", GenerationResult)
    [wrapped] = lm.loglikelihood([request("what is in the", " cat")])
    assert isinstance(wrapped, GenerationResult) and wrapped.text == plain[0] and wrapped.token_counts is None


def test_continuation_ids_split_like_the_whole_text():
    """When tokenizing prompt + continuation merges across the boundary, the continuation is tokenized alone."""

    def tok(text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) for c in text.replace("ab", "X")]  # a merge "ab" -> "X"
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    assert plugin.continuation_ids(tok, "xy", "cd") == [ord("c"), ord("d")]
    assert plugin.continuation_ids(tok, "xa", "bc") == [ord("b"), ord("c")]  # "xabc" -> x X c: no common prefix


def test_in_llm_pruning_keeps_the_same_tokens_for_every_choice(tiny_path):
    """FastV inside the LLM ranks image tokens by the last prompt token's attention: the continuation must not take
    part, so every choice is scored on the tokens generation would keep, and the greedy flag is generation's."""
    import vtok

    lm = plugin.VtokHF(pretrained=tiny_path, method="fastv", keep=0.25, layer=1)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    inputs = lm.processor(text=[lm.prompt("what is in the image ?", 1)], images=[image], return_tensors="pt")
    inputs.pop("token_type_ids", None)  # the tiny tokenizer's; generate under transformers 4.57 refuses it
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    kept = vtok.stats(lm.model)["per_sample"][0]["kept"]
    logits, tok = out.logits[0][0], lm.processor.tokenizer
    best = int(logits.argmax())
    logits[tok.all_special_ids + [lm.model.config.image_token_id]] = -float("inf")  # a word, not <image> or <pad>
    word = int(logits.argmax())
    words = list(dict.fromkeys([tok.convert_ids_to_tokens(word), "cat", "person", "photo"]))
    resps = []
    for w in words:
        resps += lm.loglikelihood([request("what is in the image ?", f" {w}")])
        assert vtok.stats(lm.model)["per_sample"][0]["kept"] == kept
    assert int(np.argmin([loss for loss, _ in resps])) == 0
    assert [g for _, g in resps] == [word == best] + [False] * (len(words) - 1)
