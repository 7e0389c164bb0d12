"""Reference pieces shared by the Hugging Face wrapper tests (``tests/hf``): greedy generation, the hand-built
greedy loop over a language model on given embeddings, and the checks several families repeat."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import vtok


def greedy(model, inputs: dict, n: int = 16, **kw) -> torch.Tensor:
    """``n`` greedy tokens of ``model.generate`` on ``inputs`` (``**kw``: more generate arguments), prompt cut off."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)[:, inputs["input_ids"].shape[1]:]


def greedy_ids(model, ids: torch.Tensor, am: torch.Tensor, n: int = 16, **kw) -> torch.Tensor:
    """``greedy`` with ``input_ids`` and ``attention_mask`` given apart (``**kw``: the other inputs)."""
    return greedy(model, {"input_ids": ids, "attention_mask": am}, n, **kw)


@torch.no_grad()
def greedy_on_embeds(model, language_model, embeds: torch.Tensor, positions: torch.Tensor, next_pos: int,
                     steps: int = 16) -> tuple[torch.Tensor, list[int]]:
    """Greedy decoding by hand, no cache: ``language_model`` on ``embeds [1, L, D]`` at ``positions [1, L]`` (an
    explicit all-ones mask: without one, transformers reads gapped position ids as packed sequences), ``model.lm_head``
    on its output, the argmax token's embedding appended at position ``next_pos + step``; ``(first logits, tokens)``."""
    emb = language_model.get_input_embeddings()
    x, pos = embeds, positions
    first, toks = None, []
    for t in range(steps):
        h = language_model(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones_like(pos),
                           use_cache=False).last_hidden_state
        logits = model.lm_head(h)
        first = logits if first is None else first
        tok = logits[:, -1].argmax(-1)
        toks.append(int(tok))
        x = torch.cat([x, emb(tok)[:, None]], 1)
        pos = torch.cat([pos, torch.tensor([[next_pos + t]])], 1)
    return first, toks


def assert_keep_all_is_identity(model, inputs: dict, layer, n: int = 8) -> None:
    """Wrapped to keep every token (``random``, keep 1.0, at ``layer``), ``model`` gives its unwrapped logits on
    ``inputs`` at the non-padding positions (within 1e-5; padding rows have every key masked and are never read) and
    the same ``n`` greedy tokens."""
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = greedy(model, inputs, n)
    with vtok.wrapped(model, "random", 1.0, layer=layer):
        with torch.no_grad():
            out = model(**inputs).logits
        tokens = greedy(model, inputs, n)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, ref_tokens)


def assert_unwrap_bit_exact(model, inputs: dict, runs: Sequence[tuple], n: int = 6) -> None:
    """Wrap ``model`` once per ``(method, keep, layer, run)`` of ``runs``, call ``run(model)`` wrapped, unwrap; then
    its logits on ``inputs`` and ``n`` greedy tokens equal those from before, bit for bit."""
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = greedy(model, inputs, n)
        for method, keep, layer, run in runs:
            vtok.wrap(model, method, keep, layer=layer)
            run(model)
            vtok.unwrap(model)
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(greedy(model, inputs, n), ref_tokens)


def assert_batch_equals_one_by_one(model, batch: dict, ones: Sequence[dict], n: int = 8) -> None:
    """Each prompt of ``batch`` run alone (``ones``, in batch order) gives the batch's last-position logits (within
    1e-4) and its ``n`` greedy tokens."""
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    toks = greedy(model, batch, n)
    for b, one in enumerate(ones):
        with torch.no_grad():
            assert (model(**one).logits[0, -1] - last[b]).abs().max() <= 1e-4
        assert greedy(model, one, n)[0].tolist() == toks[b].tolist()


def assert_recomputed_tokens(gen: torch.Tensor, ids: torch.Tensor, logits_of: Callable, steps: int) -> None:
    """The first ``steps`` tokens of ``gen [1, T]`` are the argmax of ``logits_of(seq)`` (no cache: the whole
    sequence each step), ``seq`` the prompt ``ids`` and the tokens before."""
    seq = ids
    with torch.no_grad():
        for t in range(steps):
            nxt = logits_of(seq)[0, -1].argmax()
            assert int(nxt) == int(gen[0, t]), f"token {t}"
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
