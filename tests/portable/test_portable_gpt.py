"""A GPTModel built with the portable spec against megatron-core's local spec, and packed samples."""
import torch

from portable_tiny import VOCAB, tiny_config, tiny_gpt


def _ids(b, s, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_portable_spec_matches_local_spec_logits_and_grads(mcore):
    cfg = tiny_config()
    local, portable = tiny_gpt(cfg, "local"), tiny_gpt(cfg, "portable")
    missing = portable.load_state_dict(local.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    ids = _ids(2, 16)
    pos = torch.arange(16).expand(2, 16)
    outs = []
    for model in (local, portable):
        logits = model(ids, pos, attention_mask=None)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_thd_equals_separate_samples_and_isolates_them(mcore):
    from hpctrain.model.portable.packing import packed_seq_params
    model = tiny_gpt(tiny_config(), "portable").eval()
    lens = [5, 9, 2]
    samples = [_ids(1, n, seed=i) for i, n in enumerate(lens)]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    stream = torch.cat(samples, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = model(stream, pos, attention_mask=None, packed_seq_params=packed_seq_params(cu))
        # Each sample alone (unpacked, its own causal attention, RoPE from 0) gives the same logits.
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone = model(samples[i], torch.arange(b - a)[None], attention_mask=None)
            torch.testing.assert_close(packed[:, a:b], alone, atol=1e-5, rtol=1e-5)
        # Changing sample 1 leaves samples 0 and 2 bit-for-bit in place.
        stream2 = stream.clone()
        stream2[0, 5:14] = (stream2[0, 5:14] + 7) % VOCAB
        packed2 = model(stream2, pos, attention_mask=None, packed_seq_params=packed_seq_params(cu))
    keep = torch.cat([torch.arange(0, 5), torch.arange(14, 16)])
    torch.testing.assert_close(packed2[:, keep], packed[:, keep], atol=1e-6, rtol=0)
    assert not torch.allclose(packed2[:, 5:14], packed[:, 5:14])


def test_portable_spec_has_the_local_specs_checkpoint_keys(mcore):
    cfg = tiny_config()
    local, portable = tiny_gpt(cfg, "local"), tiny_gpt(cfg, "portable")
    meta = {"dp_cp_group": None}
    want = {k: v.global_shape for k, v in local.sharded_state_dict(metadata=meta).items()
            if hasattr(v, "global_shape")}
    got = {k: v.global_shape for k, v in portable.sharded_state_dict(metadata=meta).items()
           if hasattr(v, "global_shape")}
    assert got == want
    assert got["decoder.layers.0.input_layernorm.weight"] == (2, 32)  # layer-stacked, both specs
    assert "decoder.final_layernorm.weight" in got
