"""The causal-LM adapter architecture: cached features score like the full model, generation, PEFT export."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.llm import write_chat_llama

CONVERSATIONS = [
    [{"role": "user", "content": "2023-04-17"}, {"role": "assistant", "content": "17/04/2023"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1999-12-31"}, {"role": "assistant", "content": "31/12/1999"}],
    [{"role": "user", "content": "2001-01-02"}, {"role": "assistant", "content": "02/01/2001"}],
]


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory, tiny_llama):
    return write_chat_llama(tmp_path_factory.mktemp("chat_llama") / "model", tiny_llama, seed=3)


def random_adapter(model, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in model.state_dict().items()}


def test_cached_features_score_like_the_full_peft_model(chat_llama_dir):
    from peft import PeftModel  # noqa: F401  (the reference path below is plain peft)

    from d2nwg.data.instructions import encode_conversations
    from d2nwg.targets.adapters.frozen_base import load_base_model, load_tokenizer
    from d2nwg.targets.adapters.kinds import build_peft_model, inject_adapter
    from d2nwg.targets.adapters.kinds import to_peft_state_dict
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    base = str(chat_llama_dir)
    net = CausalLMAdapter(base, "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    state = random_adapter(net)
    net.load_state_dict(state)
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, base)
    assert x.shape == (3, 32 + 160 * 32 + 2 * 160)
    score = net(x)  # (3,)

    # Reference: the whole LM with the same adapter, right-padded, on the unpadded conversations.
    tokenizer = load_tokenizer(base)
    peft = inject_adapter(build_peft_model(load_base_model(base), "lora", ["q_proj", "v_proj"], [2, 3], 2), to_peft_state_dict(state))
    batch = encode_conversations(tokenizer, CONVERSATIONS, last_turn_only=True)
    with torch.no_grad():
        logits = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * (labels != -100)
    expected = logp.sum(1) / (labels != -100).sum(1)
    torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)
    # The adapter matters: the zero adapter scores differently.
    net.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    assert not torch.allclose(net(x), score, atol=1e-3)


@pytest.mark.parametrize("kind", ["lora", "miss", "miss-bat"])
def test_a_zero_adapter_scores_as_the_base_alone(chat_llama_dir, kind):
    # The evaluation scores the base zero-shot as a zero adapter on the cached features: every kind's update is zero.
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import adapter_scores
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec
    from d2nwg.targets.population import stack_state_dicts

    arch = architecture_spec(str(chat_llama_dir), kind, ["q_proj", "v_proj"], [2, 3], 2, 160, 16)
    net = CausalLMAdapter(**arch["config"]).eval()
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, str(chat_llama_dir))
    zero = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    gen = AdapterGenerator(arch)
    gen.set_adapter(None)
    base = torch.tensor(gen.response_loglik(CONVERSATIONS)).mean()
    torch.testing.assert_close(adapter_scores(net, stack_state_dicts([zero, random_adapter(net)]), x)[0], base, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapter_scores(net, stack_state_dicts([random_adapter(net, scale=1.0)]), x)[0], base, atol=1e-3)


def test_prompt_response_pooling_weighs_the_answer_like_the_question(chat_llama_dir):
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec

    base, t, h = str(chat_llama_dir), 160, 32
    arch = architecture_spec(base, "lora", ["q_proj", "v_proj"], [2, 3], 2, t, 16, pooling="prompt-response")
    net = CausalLMAdapter(**arch["config"])
    assert net.pooling == "prompt-response"
    x = conversation_features(CONVERSATIONS, net.first, t, 16, base, pooling=net.pooling)
    old = conversation_features(CONVERSATIONS, net.first, t, 16, base)
    torch.testing.assert_close(x[:, h:], old[:, h:])  # only the conditioning part differs
    hidden, mask, labels = x[:, h : h + t * h].view(-1, t, h), x[:, h + t * h : h + t * h + t], x[:, h + t * h + t :]
    response = (labels != -100).float()
    prompt = mask - response
    assert (prompt.sum(1) > 3 * response.sum(1)).all()  # the template makes prompts long: a plain mean is theirs
    unit = lambda w: torch.nn.functional.normalize((hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True), dim=-1)  # noqa: E731
    torch.testing.assert_close(x[:, :h], unit(prompt) + unit(response), atol=1e-5, rtol=1e-5)
    # The same prompt with another answer moves the embedding by a whole unit-norm term, not a few tokens' share.
    other = [[*CONVERSATIONS[0][:-1], {"role": "assistant", "content": "April 17, 2023"}]]
    y = conversation_features(other, net.first, t, 16, base, pooling=net.pooling)
    z = conversation_features(other, net.first, t, 16, base)
    moved = lambda a, b: float(torch.nn.functional.cosine_similarity(a[0, :h], b[0, :h], dim=0))  # noqa: E731
    assert moved(y, x) < moved(z, old)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        conversation_features(CONVERSATIONS, net.first, t, 16, base, pooling="max")
    with pytest.raises(ValueError, match="unknown pooling"):
        architecture_spec(base, "lora", ["q_proj"], [2], 2, t, 16, pooling="max")
    assert "pooling" not in architecture_spec(base, "lora", ["q_proj"], [2], 2, t, 16)["config"]  # old zoos read as final-mean


def test_response_longer_than_the_window_is_one_line(chat_llama_dir):
    from d2nwg.targets.causal_lm.features import conversation_features

    with pytest.raises(ValueError, match=r"conversation 0 .*response_window=4"):
        conversation_features(CONVERSATIONS, 2, 160, 4, str(chat_llama_dir))


def test_generator_export_and_autopeft_reload_agree(chat_llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from d2nwg.data.instructions import decode_response, encode_prompts, stop_token_ids
    from d2nwg.targets.adapters.frozen_base import load_tokenizer
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator, exact_match, references
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec
    from d2nwg.targets.causal_lm.peft_export import save_causal_lm_adapter

    base = str(chat_llama_dir)
    arch = architecture_spec(base, "lora", ["q_proj", "v_proj"], [2, 3], 2, 160, 16)
    net = CausalLMAdapter(**arch["config"])
    state = random_adapter(net, seed=1, scale=1.0)
    gen = AdapterGenerator(arch)
    gen.set_adapter(state)
    adapted = gen.answer(CONVERSATIONS, max_new_tokens=8)
    gen.set_adapter(None)
    plain = gen.answer(CONVERSATIONS, max_new_tokens=8)
    assert adapted != plain  # a random adapter changes what a random LM says

    folder = save_causal_lm_adapter(state, arch, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base
    reloaded = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(base)
    for conversation, answer in zip(CONVERSATIONS, adapted):
        ids = torch.tensor([encode_prompts(tokenizer, [conversation])[0]])
        out = reloaded.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_token_ids(tokenizer))
        assert decode_response(tokenizer, out[0, ids.shape[1]:]) == answer
    assert exact_match(adapted, adapted) == 1.0
    assert exact_match([" 17/04/2023 ", "x", "y"], references(CONVERSATIONS)) == pytest.approx(1 / 3)


def test_answer_many_gives_each_adapter_its_own_answers(chat_llama_dir):
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec

    arch = architecture_spec(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], [2, 3], 2, 160, 16)
    net = CausalLMAdapter(**arch["config"])
    states = [random_adapter(net, seed=s, scale=1.0) for s in (4, 5)] + [None] + [random_adapter(net, seed=6, scale=1.0)]
    gen = AdapterGenerator(arch)
    one_by_one = []
    for state in states:
        gen.set_adapter(state)  # None: the base alone
        one_by_one.append(gen.answer(CONVERSATIONS, max_new_tokens=8, batch_size=2))
    assert len({tuple(a) for a in one_by_one}) == len(states)  # the adapters and the base differ: routing rows matters
    assert gen.answer_many(states, CONVERSATIONS, max_new_tokens=8, batch_size=2) == one_by_one
    assert gen.answer_many(states[::-1], CONVERSATIONS, max_new_tokens=8, batch_size=2) == one_by_one[::-1]  # reloaded
    gen.set_adapter(states[0])
    assert gen.answer(CONVERSATIONS, max_new_tokens=8, batch_size=2) == one_by_one[0]  # the default adapter is untouched


def test_shared_in_context_prefix_is_encoded_once_with_the_same_answers_and_logliks(chat_llama_dir, monkeypatch):
    import d2nwg.targets.causal_lm.decoding as causal_lm
    from d2nwg.data.instructions import encode_prompts, with_examples
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator, shared_prefix_length
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec

    assert shared_prefix_length([[1] * 40 + [2], [1] * 40 + [3, 4]]) == 40
    assert shared_prefix_length([[1] * 40, [1] * 40]) == 39  # each row keeps a token of its own
    assert shared_prefix_length([[1] * 10 + [2], [1] * 10 + [3]]) == 0  # too short to be worth a forward
    assert shared_prefix_length([[1] * 40 + [2]]) == 0

    arch = architecture_spec(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], [2, 3], 2, 160, 16)
    gen = AdapterGenerator(arch)
    # Test prompts of different lengths behind the same 3 in-context examples: rows are padded between the
    # shared prefix and their own tokens.
    tests = [
        [{"role": "user", "content": d}, {"role": "assistant", "content": "x"}]
        for d in ("2024-02-29", "1900-01-01 please", "12", "2010-10-10, in words")
    ]
    prompts = [with_examples(c, CONVERSATIONS, 3) for c in tests]
    assert shared_prefix_length(encode_prompts(gen.tokenizer, prompts)) > 0
    # One prompt with different responses: everything before the responses is shared, so the prefix must stop
    # one token short of them (that position predicts their first token).
    answers = [with_examples([tests[0][0], {"role": "assistant", "content": r}], CONVERSATIONS, 3) for r in ("29/02/2024", "Feb 29", "x")]
    for state in (random_adapter(CausalLMAdapter(**arch["config"]), seed=7, scale=1.0), None):
        gen.set_adapter(state)
        shared = gen.answer(prompts, max_new_tokens=8), gen.response_loglik(prompts), gen.response_loglik(answers)
        with monkeypatch.context() as m:
            m.setattr(causal_lm, "SHARED_PREFIX_MIN", 10**9)  # every row encodes the whole prompt
            alone = gen.answer(prompts, max_new_tokens=8), gen.response_loglik(prompts), gen.response_loglik(answers)
        assert shared[0] == alone[0]
        for got, expected in zip(shared[1:], alone[1:]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # Against the plain full-vocabulary computation over every position (what transformers' loss does).
    from d2nwg.data.instructions import encode_conversations

    batch = encode_conversations(gen.tokenizer, answers, last_turn_only=True)
    with torch.no_grad(), gen.model.disable_adapter():
        logits = gen.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * (labels != -100)
    expected = logp.sum(1) / (labels != -100).sum(1)
    torch.testing.assert_close(torch.tensor(gen.response_loglik(answers)), expected, atol=1e-4, rtol=1e-4)


def test_precision_context_autocasts_bf16_and_refuses_unknown_names():
    from d2nwg.targets.causal_lm.finetune import precision_context

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision_context("bf16-mixed", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with precision_context("32-true", "cpu"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision_context("fp8", "cpu")


def test_adapters_with_their_own_inits_train_as_they_would_alone(chat_llama_dir):
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import adapter_scores, train_adapters
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    net = CausalLMAdapter(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, str(chat_llama_dir))
    inits = [random_adapter(net, seed=1, scale=0.05), random_adapter(net, seed=2, scale=0.05)]
    together = train_adapters(net, inits, x.expand(2, *x.shape), steps=4, lr=1e-2, batch_size=2, seed=0)
    for i, init in enumerate(inits):
        alone = train_adapters(net, init, x[None], steps=4, lr=1e-2, batch_size=2, seed=0)
        for name, value in alone.items():
            torch.testing.assert_close(together[name][i], value[0], atol=1e-5, rtol=1e-5)
    # Training moved each adapter towards its data: the responses are likelier than from where it started.
    before = adapter_scores(net, {k: torch.stack([s[k] for s in inits]) for k in inits[0]}, x)
    assert (adapter_scores(net, together, x) > before).all()
    with pytest.raises(ValueError, match="3 initial adapters for 2 training sets"):
        train_adapters(net, [*inits, inits[0]], x.expand(2, *x.shape), steps=1, lr=1e-2)


def test_adapter_scores_run_eval_batch_adapters_at_a_time(chat_llama_dir, monkeypatch):
    import torch.func

    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import adapter_scores
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    net = CausalLMAdapter(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, str(chat_llama_dir))
    adapters = [random_adapter(net, seed=s, scale=0.05) for s in range(5)]
    stacked = {k: torch.stack([a[k] for a in adapters]) for k in adapters[0]}
    net.eval_batch = 5
    together = adapter_scores(net, stacked, x)
    own = adapter_scores(net, stacked, x.expand(5, *x.shape))  # each adapter on its own (here equal) samples
    sizes, real = [], torch.func.vmap

    def recording(fn, in_dims=0, **kwargs):
        mapped = real(fn, in_dims=in_dims, **kwargs)

        def call(params, xs):
            sizes.append(next(iter(params.values())).shape[0])
            return mapped(params, xs)

        return call

    monkeypatch.setattr(torch.func, "vmap", recording)
    net.eval_batch = 2
    for samples, expected in ((x, together), (x.expand(5, *x.shape), own)):
        sizes.clear()
        torch.testing.assert_close(adapter_scores(net, stacked, samples, batch_size=2), expected, atol=1e-5, rtol=1e-5)
        assert max(sizes) == 2 and sum(sizes) == 5 * -(-len(CONVERSATIONS) // 2)  # every adapter, every sample chunk
    assert torch.unique(together).numel() == 5  # five different adapters, five different scores


def test_finetune_adapter_follows_its_settings_and_support_finetuning_scales_the_members(chat_llama_dir):
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import (
        MEMBER_TRAINING,
        adapter_scores,
        finetune_adapter,
        member_training,
        support_finetuning,
        train_adapters,
    )
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    net = CausalLMAdapter(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, str(chat_llama_dir))
    init = random_adapter(net, seed=1, scale=0.05)
    settings = {"steps": 3, "lr": 1e-2, "batch_size": 2, "precision": "32-true"}
    tuned = finetune_adapter(net, init, x, settings, seed=4)
    direct = train_adapters(net, init, x[None], steps=3, lr=1e-2, batch_size=2, seed=4)
    assert tuned.keys() == init.keys()
    assert all(torch.equal(tuned[k], direct[k][0]) for k in tuned)
    stack = lambda *sds: {k: torch.stack([sd[k] for sd in sds]) for k in init}  # noqa: E731
    before, after = adapter_scores(net, stack(init, tuned), x).tolist()
    assert after > before

    # The recipe's values win (its member_lr over its lr, the warm start's); missing ones come from the kind's defaults.
    assert member_training({"steps": 10, "lr": 0.1}, "lora") == {**MEMBER_TRAINING["lora"], "steps": 10, "lr": 0.1}
    assert member_training({"lr": 0.1, "member_lr": 0.3}, "miss")["lr"] == 0.3
    assert member_training({"lr": 0.1, "member_lr": 0.0}, "miss")["lr"] == 0.1  # 0: members train at lr
    assert member_training(None, "miss")["precision"] == "32-true" and member_training(None, "lora")["precision"] == "bf16-mixed"
    member = member_training(None, "miss")
    generated = support_finetuning(member, "generated")
    assert generated["steps"] == member["steps"] // 2 and generated["lr"] == pytest.approx(member["lr"] / 5)
    assert support_finetuning(member, "warm_start", steps=3, lr=0.5) == {**member, "steps": 3, "lr": 0.5}
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        support_finetuning(member, steps=0)
    with pytest.raises(ValueError, match="learning rate must be > 0, got -1"):
        support_finetuning(member, lr=-1.0)


def test_finetune_adapters_train_each_adapter_as_alone_in_groups_of_equal_shape(chat_llama_dir, monkeypatch):
    import d2nwg.targets.causal_lm.finetune as causal_lm
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import finetune_adapter, finetune_adapters
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    net = CausalLMAdapter(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, str(chat_llama_dir))
    inits = [random_adapter(net, seed=s, scale=0.05) for s in (1, 2, 3)]
    xs = [x, x.flip(0), x[:2]]  # the third has fewer samples: it trains in a group of its own
    settings = {"steps": 3, "lr": 1e-2, "batch_size": 2, "precision": "32-true"}
    groups = []
    train = causal_lm.train_adapters
    monkeypatch.setattr(causal_lm, "train_adapters", lambda m, init, xx, **kw: groups.append(len(init)) or train(m, init, xx, **kw))
    together = finetune_adapters(net, inits, xs, settings, seed=4, group_size=8)
    assert groups == [2, 1]
    for init, xi, got in zip(inits, xs, together):
        alone = finetune_adapter(net, init, xi, settings, seed=4)
        assert got.keys() == init.keys()
        assert all(torch.allclose(got[k], alone[k], atol=1e-5) for k in got)
        assert not all(torch.equal(got[k], init[k]) for k in got)
    groups.clear()
    finetune_adapters(net, inits[:2], xs[:2], settings, seed=4, group_size=1)
    assert groups == [1, 1]
    with pytest.raises(ValueError, match="2 initial adapters for 3 training sets"):
        finetune_adapters(net, inits[:2], xs, settings)


def test_caching_stops_at_the_slice_and_answer_many_runs_the_layers_below_it_once_per_prompt(chat_llama_dir):
    from d2nwg.targets.adapters.frozen_base import load_base_model
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec

    base = str(chat_llama_dir)
    encoder = load_base_model(base)
    layers = encoder.base_model.layers
    rows: dict[int, list[int]] = {0: [], 3: []}
    for i in rows:
        layers[i].register_forward_pre_hook(lambda _m, args, i=i: rows[i].append(args[0].shape[0]))
    conversation_features(CONVERSATIONS, 2, 160, 16, base, encoder=encoder, pooling="prompt-response")
    assert rows == {0: [3], 3: []}  # the layer above the cached input never ran
    conversation_features(CONVERSATIONS, 2, 160, 16, base, encoder=encoder)  # final-mean needs the last layer
    assert rows == {0: [3, 3], 3: [3]}

    arch = architecture_spec(base, "lora", ["q_proj", "v_proj"], [2, 3], 2, 160, 16)
    net = CausalLMAdapter(**arch["config"])
    states = [random_adapter(net, seed=s, scale=1.0) for s in (7, 8, 9, 10)]
    gen = AdapterGenerator(arch)
    seen: dict[str, list[int]] = {"below": [], "slice": []}
    stack = gen.model.get_base_model().model.layers
    stack[0].register_forward_hook(lambda _m, args, _out: seen["below"].append(args[0].shape[0]))
    stack[2].register_forward_hook(lambda _m, args, _out: seen["slice"].append(args[0].shape[0]))  # ran to the end
    answers = gen.answer_many(states, CONVERSATIONS, max_new_tokens=4, batch_size=3)
    # The prompts' prefill: 3 rows below the slice, 3 prompts x 4 adapters in it; decoding runs every row.
    assert seen["below"][0] == 3 and seen["slice"][0] == 12 and set(seen["below"][1:]) == {12}
    one_by_one = []
    for state in states:
        gen.set_adapter(state)
        one_by_one.append(gen.answer(CONVERSATIONS, max_new_tokens=4, batch_size=3))
    assert answers == one_by_one


def test_response_extent_drops_padding_columns_and_unused_window_positions_not_the_score(chat_llama_dir):
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import adapter_scores, train_adapters
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    net = CausalLMAdapter(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    x = conversation_features(CONVERSATIONS, net.first, 160, 16, str(chat_llama_dir))
    start, window = net.response_extent(x)
    lengths = x[:, 32 + 160 * 32 : 32 + 160 * 32 + 160].sum(1)
    first_label = int((x[:, -160:] != -100).float().argmax(1).min())  # rows are left-padded: responses end them
    assert start == 160 - int(lengths.max()) and window == 160 - first_label < 16
    assert net.response_extent(x[1:2])[0] > start  # a batch of shorter rows drops more columns
    state = random_adapter(net, seed=11, scale=0.3)
    net.load_state_dict(state)
    torch.testing.assert_close(net(x, extent=(start, window)), net(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(x[1:2], extent=net.response_extent(x[1:2])), net(x[1:2]), atol=1e-5, rtol=1e-5)
    # train_adapters and adapter_scores trim each batch: the same adapters and scores as the full rows give.
    trained = train_adapters(net, state, x[None], steps=3, lr=1e-2, batch_size=2, seed=0)
    scores = adapter_scores(net, trained, x)
    net.response_extent = lambda _x: (0, 16)  # the untrimmed rows
    torch.testing.assert_close(train_adapters(net, state, x[None], steps=3, lr=1e-2, batch_size=2, seed=0), trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter_scores(net, trained, x), scores, atol=1e-5, rtol=1e-5)


def test_response_extent_keeps_the_position_before_a_rows_first_labelled_token(chat_llama_dir):
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

    net = CausalLMAdapter(str(chat_llama_dir), "lora", ["q_proj", "v_proj"], layers=[2, 3], r=2, max_length=160, response_window=16)
    net.load_state_dict(random_adapter(net, seed=12, scale=0.3))
    g = torch.Generator().manual_seed(0)
    for k in (1, 3):  # rows of k real tokens, every one labelled: the padding column before them scores the first
        hidden, mask, labels = torch.zeros(2, 160, 32), torch.zeros(2, 160), torch.full((2, 160), -100.0)
        hidden[:, -k:], mask[:, -k:] = torch.randn(2, k, 32, generator=g), 1.0
        labels[:, -k:] = torch.randint(0, 100, (2, k), generator=g).float()
        x = torch.cat([torch.zeros(2, 32), hidden.flatten(1), mask, labels], dim=1)
        torch.testing.assert_close(net(x, extent=net.response_extent(x)), net(x), atol=1e-5, rtol=1e-5)


def test_gradient_condition_is_the_sketched_descent_direction_of_the_task(chat_llama_dir):
    from d2nwg.targets.causal_lm.conditioning import gradient_condition, task_gradient
    from d2nwg.targets.causal_lm.features import GRADIENT_POOLING, conversation_features
    from d2nwg.targets.causal_lm.finetune import adapter_scores
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter, architecture_spec
    from d2nwg.targets.population import stack_state_dicts

    base, t, h = str(chat_llama_dir), 160, 32
    arch = architecture_spec(base, "lora", ["q_proj", "v_proj"], [2, 3], 2, t, 16, pooling=GRADIENT_POOLING)
    net = CausalLMAdapter(**arch["config"])
    assert net.condition_width == 2 * h
    x = conversation_features(CONVERSATIONS, net.first, t, 16, base, pooling=net.pooling)
    plain = conversation_features(CONVERSATIONS, net.first, t, 16, base, pooling="prompt-response")
    assert x.shape == (3, 2 * h + t * h + 2 * t) and not x[:, h : 2 * h].any()  # the block waits for the anchor
    torch.testing.assert_close(x[:, :h], plain[:, :h])
    anchor = random_adapter(net, seed=1, scale=0.1)
    filled = gradient_condition(net, anchor, x)
    block = filled[:, h : 2 * h]
    torch.testing.assert_close(block, block[:1].expand_as(block))  # one dataset feature, in every row
    assert abs(float(block[0].norm()) - 1) < 1e-5
    torch.testing.assert_close(filled[:, :h], x[:, :h])
    torch.testing.assert_close(filled[:, 2 * h :], x[:, 2 * h :])
    assert not x[:, h : 2 * h].any()  # the input is not changed
    # The same records in another order (and in other batches) give the same feature.
    torch.testing.assert_close(gradient_condition(net, anchor, x.flip(0))[:, h : 2 * h], block, atol=1e-5, rtol=1e-4)
    g = task_gradient(net, anchor, x)
    torch.testing.assert_close(task_gradient(net, anchor, x, batch_size=1), g, atol=1e-6, rtol=1e-4)
    # It is the gradient of the records' loss: a small step against it raises their log-likelihood.
    keys = list(net.state_dict())
    sizes = [anchor[k].numel() for k in keys]
    step = {k: anchor[k] - 1e-2 * d.view_as(anchor[k]) / g.norm() for k, d in zip(keys, g.split(sizes))}
    before, after = adapter_scores(net, stack_state_dicts([anchor, step]), x).tolist()
    assert after > before
    # Another task (other answers) pulls the adapter elsewhere.
    other = [[*c[:-1], {"role": "assistant", "content": c[-1]["content"].replace("/", "-")}] for c in CONVERSATIONS]
    y = gradient_condition(net, anchor, conversation_features(other, net.first, t, 16, base, pooling=net.pooling))
    assert float(y[0, h : 2 * h] @ block[0]) < 0.99
    # Only gradient-pooled architectures have the block.
    with pytest.raises(ValueError, match="needs pooling 'prompt-response-gradient'"):
        gradient_condition(CausalLMAdapter(base, "lora", ["q_proj", "v_proj"], [2, 3], 2, t, 16), anchor, plain)
    with pytest.raises(ValueError, match="has no tensor"):
        task_gradient(net, {}, x)
