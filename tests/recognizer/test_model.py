"""Tests for the recognizer network: shapes, sizes, key-derived init, decoding and a short fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recognizer import hashing
from recognizer.blocks import channel_shuffle
from recognizer.charset import DEFAULT_ALPHABET, EOS, MAX_SEQ_LEN, PAD, get_alphabet
from recognizer.decoder import AttentionDecoder
from recognizer.model import PRESETS, build_model, count_params, model_info
from recognizer.tps import TPSGrid, _ctrl_points

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))

NUM_CLASSES = get_alphabet(DEFAULT_ALPHABET).num_classes
START = get_alphabet(DEFAULT_ALPHABET).start


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 256, generator=g) * 2 - 1


def _targets(n: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, t), PAD, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, t, (1,), generator=g))
        out[i, :length] = torch.randint(2, NUM_CLASSES, (length,), generator=g)  # symbols, not EOS/PAD
        out[i, length] = EOS
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_forward_shapes_and_sequence_length(preset):
    model = build_model(preset, KEY_A, gamma=None)
    images, targets = _images(2), _targets(2, 7)

    logits = model(images, targets)
    seq = model._encode(images)

    assert logits.shape == (2, 7, NUM_CLASSES)
    c = PRESETS[preset]
    (h, w), patch = c.tps_output_hw, c.vit_patch
    if c.encoder == "vit" and c.vit_columns:  # a BiLSTM step per column of patches
        assert seq.shape == (2, w // patch, 2 * c.lstm_hidden)
    elif c.encoder == "vit":  # one token of width vit_dim per patch
        assert seq.shape == (2, (h // patch) * (w // patch), c.vit_dim)
    else:
        columns = c.tps_output_hw[1] // 4  # 25 at 32x100, 40 at fedocr-cpu-wide's 32x160
        assert seq.shape == (2, columns, 2 * c.lstm_hidden)
    assert torch.isfinite(logits).all()


def test_param_counts_match_the_paper():
    aster = count_params(build_model("aster-fl", KEY_A, gamma=None))
    fedocr = model_info("fedocr", 1.0)

    assert abs(aster - 20.99e6) / 20.99e6 < 0.02
    assert abs(fedocr["real_params"] - 13.34e6) / 13.34e6 < 0.05
    assert fedocr["real_params"] == fedocr["virtual_params"]


def test_small_presets_are_small():
    for preset in ("aster-fl-small", "fedocr-small"):
        assert 1e6 <= count_params(build_model(preset, KEY_A, gamma=None)) <= 3e6
    assert count_params(build_model("fedocr-tiny", KEY_A, gamma=None)) < 1e6


def test_real_params_scale_with_gamma():
    infos = {g: model_info("fedocr-tiny", g) for g in (None, 1.0, 0.25, 0.125)}
    virtual = infos[None]["virtual_params"]
    n_tensors = len(infos[None]["layers"])

    assert {i["virtual_params"] for i in infos.values()} == {virtual}
    assert infos[1.0]["real_params"] == virtual
    for g in (0.25, 0.125):
        hashed = sum(x["virtual"] for x in infos[g]["layers"] if x["ratio"] < 1)
        plain = virtual - hashed
        # ceil(gamma * T) per hashed tensor; batch norm stays plain.
        assert g * hashed + plain <= infos[g]["real_params"] <= g * hashed + plain + n_tensors
    assert infos[0.125]["state_bytes"] < infos[0.25]["state_bytes"] < infos[1.0]["state_bytes"]


def test_same_key_same_init_other_key_different():
    rng_before = torch.random.get_rng_state()
    images, targets = _images(2), _targets(2, 5)

    outs = []
    for key in (KEY_A, KEY_A, KEY_B):
        model = build_model("fedocr-tiny", key, gamma=0.5).eval()
        outs.append(model(images, targets))

    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_hashing_at_gamma_one_keeps_the_plain_function():
    images, targets = _images(2), _targets(2, 6)
    plain = build_model("fedocr-tiny", KEY_A, gamma=None).eval()
    hashed = build_model("fedocr-tiny", KEY_A, gamma=1.0).eval()

    assert hashed.gamma == 1.0 and plain.gamma is None
    torch.testing.assert_close(hashed(images, targets), plain(images, targets))


def test_hashed_weights_are_gathered_once_per_forward(monkeypatch):
    model = build_model("fedocr-tiny", KEY_A, gamma=0.25)
    images = _images(2)
    calls = []
    real_index_select = torch.index_select

    def counting(*args, **kwargs):
        calls.append(1)
        return real_index_select(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", counting)
    counts = []
    for t in (3, 12):
        calls.clear()
        model(images, _targets(2, t))
        counts.append(len(calls))

    names = [h.name for h in hashing.hashed_layers(model)]
    # The auxiliary CTC head serves training only: a forward gathers everything else once.
    assert counts[0] == counts[1] == len([n for n in names if not n.startswith("ctc_head.")]) > 0
    calls.clear()
    model.training_loss(images, _targets(2, 5))
    assert len(calls) == len(names)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="fedocr-tiny"):
        build_model("resnet-9000", KEY_A)


@pytest.mark.parametrize("beam_width", [1, 5])
def test_predict_returns_valid_ids(beam_width):
    model = build_model("fedocr-tiny", KEY_A, gamma=0.25)
    model.train()

    preds = model.predict(_images(3), beam_width=beam_width, max_len=8)

    assert model.training  # predict restores the mode
    assert len(preds) == 3
    for ids in preds:
        assert len(ids) <= 8
        assert all(isinstance(i, int) and 0 <= i < NUM_CLASSES and i not in (EOS, PAD) for i in ids)


def test_greedy_decoding_agrees_with_teacher_forcing():
    model = build_model("fedocr-tiny", KEY_A, gamma=0.5).eval()
    images = _images(3, seed=1)

    preds = model.predict(images, beam_width=1)

    for i, ids in enumerate(preds):
        seq = ids + [EOS] if len(ids) < MAX_SEQ_LEN else ids
        logits = model(images[i : i + 1], torch.tensor([seq]))
        logits[..., PAD] = float("-inf")
        assert logits.argmax(-1)[0].tolist() == seq


def test_beam_search_rows_are_independent():
    model = build_model("fedocr-tiny", KEY_B, gamma=0.25)
    images = _images(3, seed=2)

    batched = model.predict(images, beam_width=5)
    single = [model.predict(images[i : i + 1], beam_width=5)[0] for i in range(3)]

    assert batched == single


def test_tps_with_source_equal_to_target_is_the_identity():
    grid = TPSGrid((8, 20), 20, (0.05, 0.05))
    ctrl = _ctrl_points(20, 0.05, 0.05).float().unsqueeze(0)

    out = grid(ctrl)[0]

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 20), indexing="ij")
    torch.testing.assert_close(out, torch.stack([xs, ys], -1), atol=1e-4, rtol=0)


def test_tiny_loss_falls_on_a_fixed_batch(one_thread):
    model = build_model("fedocr-tiny", KEY_A, gamma=0.25)
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    images, targets = _images(8, seed=3), _targets(8, 6, seed=3)

    losses = []
    for _ in range(12):
        opt.zero_grad()
        logits = model(images, targets)
        loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES), targets.reshape(-1), ignore_index=PAD)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert losses[-1] < 0.8 * losses[0]


def test_fused_decoder_step_matches_the_reference_cell():
    torch.manual_seed(0)
    dec = AttentionDecoder(in_dim=8, hidden=6, attention=5, embedding=4, num_classes=NUM_CLASSES)
    dec.reset_parameters()
    nn.init.normal_(dec.s_embed.weight)  # the default init is too small to test the attention path
    nn.init.normal_(dec.w_embed.weight)
    feats, state, prev = torch.randn(3, 7, 8), torch.randn(3, 6), torch.tensor([0, START, NUM_CLASSES - 1])

    w = dec._weights()
    emb_proj = F.linear(dec.embedding(prev), w.emb, w.emb_bias)
    ours, _ = dec._step(w, feats, dec.x_embed(feats), state, emb_proj, dec._first_alpha(feats))

    # aster.pytorch's DecoderUnit, written with the modules themselves.
    scores = dec.w_embed(torch.tanh(dec.x_embed(feats) + dec.s_embed(state).unsqueeze(1))).squeeze(2)
    context = torch.bmm(torch.softmax(scores, 1).unsqueeze(1), feats).squeeze(1)
    ref = dec.gru(torch.cat([dec.embedding(prev), context], 1), state)
    torch.testing.assert_close(ours, ref)


def test_channel_shuffle_interleaves_the_two_halves():
    x = torch.arange(6.0).view(1, 6, 1, 1)

    out = channel_shuffle(x, 2)

    assert out.flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_bf16_autocast_forward_keeps_the_tps_grid_in_float32():
    with_tps = dataclasses.replace(PRESETS["fedocr-tiny"], tps=True, input_hw=(64, 256))
    model = build_model(with_tps, KEY_A, gamma=0.25)
    images, targets = _images(2), _targets(2, 5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        grid = model.rectifier.grid(torch.rand(2, 20, 2))
        logits = model(images, targets)

    assert grid.dtype == torch.float32
    assert logits.shape == (2, 5, NUM_CLASSES) and torch.isfinite(logits.float()).all()


def test_polarity_norm_reads_dark_on_light_and_light_on_dark_alike():
    from recognizer.blocks import PolarityNorm

    norm = PolarityNorm()
    text = torch.zeros(1, 1, 32, 100)
    text[:, :, 10:22, 20:30] = 1.0  # a glyph-sized block away from the border
    dark_on_light = (0.6 - 1.2 * text).expand(-1, 3, -1, -1)  # a light grey page, dark ink
    # Coloured light ink on a dark page, of the same grey contrast (1.2).
    light_on_dark = torch.cat([-0.8 + 1.3 * text, -0.5 + 1.0 * text, -0.9 + 1.3 * text], 1)

    a, b = norm(dark_on_light), norm(light_on_dark)
    assert a.shape == (1, 3, 32, 100)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert a[0, 0, 15, 25] > 0 > a[0, 0, 2, 2]  # the text bright, the background dark
    torch.testing.assert_close(a[0, 0].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert torch.isfinite(norm(torch.zeros(2, 3, 32, 100))).all()  # a blank image stays finite


def test_cpu_presets_normalize_their_input_and_the_paper_presets_do_not():
    assert PRESETS["fedocr-tiny"].polarity_norm and not PRESETS["fedocr"].polarity_norm
    assert build_model("fedocr-tiny", bytes(32), 0.5).input_norm is not None
    assert build_model("aster-fl", bytes(32), None).input_norm is None
