"""The projection head, both encoders and the USER model: shapes, masking, momentum, queues, state."""

import copy
import threading

import pytest
import torch

from xmcl.contrast import build_retrieval_loss
from xmcl.errors import ConfigError, DataError
from xmcl.nn.global_batchnorm import batchnorm_of_linear, fold_batchnorm
from xmcl.nn.heads import ProjectionHead
from xmcl.retrieval.config import RetrievalLossConfig
from xmcl.retrieval.encoders import HFTextModel, build_text_encoder, drop_grid_cells, project_valid_positions
from xmcl.retrieval.model import USERModel

from helpers import EMBED, VOCAB, model_config, region_batch, save_tiny_bert



@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random 1-layer BERT and its tokenizer saved like a pretrained model."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


# ---------------------------------------------------------------- projection head

def test_projection_head_normalises_over_valid_locals_only():
    torch.manual_seed(0)
    head = ProjectionHead(6, 4).train()
    lengths = torch.tensor([3, 1, 2])
    x = torch.randn(3, 3, 6)
    padded = torch.full((3, 7, 6), 50.0)
    padded[:, :3] = x
    for b, n in enumerate(lengths.tolist()):
        padded[b, n:] = 50.0
    out = head(padded, lengths)
    valid = torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])
    hidden = head.mlp[0](valid)
    normalised = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + 1e-5)
    expected = head.fc(valid) + head.mlp[3](torch.relu(normalised * head.mlp[1].weight + head.mlp[1].bias))
    torch.testing.assert_close(torch.cat([out[b, :n] for b, n in enumerate(lengths.tolist())]), expected)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(out[b, n:] == 0)
    assert head(torch.randn(5, 6)).shape == (5, 4)  # no lengths: every row is a location
    full, one_pad = torch.full((3,), 3), torch.cat([x, torch.full((3, 1, 6), 50.0)], dim=1)
    torch.testing.assert_close(head(x, full), head(one_pad, full)[:, :3])  # unpadded path = masked path


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_is_the_layer_and_its_eval_norm_in_one_product(affine, bias):
    torch.manual_seed(5)
    linear, norm = torch.nn.Linear(7, 4, bias=bias), torch.nn.BatchNorm1d(4, affine=affine).eval()
    norm.running_mean.uniform_(-1.0, 1.0)
    norm.running_var.uniform_(0.2, 3.0)
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(9, 7)
    weight, shift = fold_batchnorm(linear, norm, scale=2.0)
    torch.testing.assert_close(x @ weight.t() + shift, 2.0 * norm(linear(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_of_linear_is_the_norm_of_the_layer_without_its_bias_in_training(momentum):
    """The output, the input and weight gradients and the running statistics (over three steps, the cumulative
    average included) equal ``norm(linear(x))``; the bias, which the norm cancels, gets an exact 0 gradient; eval
    mode and a norm without running statistics work too."""
    torch.manual_seed(8)
    linear, norm = torch.nn.Linear(7, 4), torch.nn.BatchNorm1d(4, momentum=momentum)
    linear.bias.data.uniform_(-2.0, 2.0)
    twin_linear, twin_norm = copy.deepcopy(linear), copy.deepcopy(norm)
    for step in range(3):
        mine = torch.randn(9, 7).requires_grad_(True)
        theirs = mine.detach().clone().requires_grad_(True)
        got, expected = batchnorm_of_linear(linear, norm, mine), twin_norm(twin_linear(theirs))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        weights = torch.randn(9, 4)
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(linear.weight.grad, twin_linear.weight.grad, rtol=1e-4, atol=1e-5)
        assert torch.equal(linear.bias.grad, torch.zeros(4)) and twin_linear.bias.grad.abs().max() < 1e-5
        torch.testing.assert_close(norm.running_mean, twin_norm.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(norm.running_var, twin_norm.running_var)
        linear.zero_grad(), twin_linear.zero_grad()
    assert int(norm.num_batches_tracked) == 3
    norm.eval(), twin_norm.eval()
    x = torch.randn(5, 7)
    torch.testing.assert_close(batchnorm_of_linear(linear, norm, x), twin_norm(twin_linear(x)))
    stateless = torch.nn.BatchNorm1d(4, track_running_stats=False)
    torch.testing.assert_close(batchnorm_of_linear(linear, stateless, x), stateless(linear(x)), rtol=1e-5, atol=1e-5)


def test_projection_head_equals_its_layers_in_training_and_in_eval_with_gradients():
    """``project`` accumulates fc's and the MLP's products in one buffer, leaves out W_1's bias in training and, in
    eval mode, folds BN into W_1: the same values and gradients as ``fc(x) + mlp(x)`` through the layers' own forward
    (where W_1's bias, which BN cancels, gets an exact 0 in training: rounding noise in the layers')."""
    torch.manual_seed(3)
    head = ProjectionHead(12, 10, hidden_dim=6)
    norm = head.mlp[1]
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-0.3, 0.3)
    for layer in (head.fc, head.mlp[0], head.mlp[3]):
        layer.bias.data.uniform_(-0.2, 0.2)
    twin = ProjectionHead(12, 10, hidden_dim=6)
    twin.load_state_dict(head.state_dict())
    x, weights = torch.randn(4, 5, 12), torch.randn(4, 5, 10)
    for training in (True, False):
        head.train(training), twin.train(training)
        mine, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = head(mine, torch.full((4,), 5))
        expected = (twin.fc(theirs) + twin.mlp(theirs.reshape(-1, 12)).view(4, 5, 10))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(head.named_parameters(), twin.parameters()):
            if training and name == "mlp.0.bias":
                assert not p.grad.any() and q.grad.abs().max() < 1e-5
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"{name} (training={training})")
            p.grad, q.grad = None, None
    torch.testing.assert_close(head.mlp[1].running_mean, twin.mlp[1].running_mean)


# ---------------------------------------------------------------- encoders

def test_grid_drop_keeps_cells_in_order_at_the_front():
    torch.manual_seed(0)
    features = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1) + 1
    dropped, lengths = drop_grid_cells(features, rate=0.9)
    assert dropped.shape[1] == int(lengths.max()) and torch.all(lengths >= 1)
    for b in range(2):
        kept = dropped[b, : lengths[b], 0].tolist()
        assert kept == sorted(kept) and set(kept) <= set(features[b, :, 0].tolist())
    untouched, full = drop_grid_cells(features, rate=0.0)
    assert torch.equal(untouched, features) and full.tolist() == [10, 10]


def test_bert_text_encoder_loads_a_local_model_and_ignores_padding(tiny_bert_dir):
    encoder = build_text_encoder(model_config(text_encoder="bert", text_model=str(tiny_bert_dir), sge=False,
                                             text_sge=True)).eval()
    tokens = torch.tensor([[2, 5, 6, 7, 3, 0, 0], [2, 9, 6, 3, 0, 0, 0]])
    lengths = torch.tensor([5, 4])
    with torch.no_grad():
        both = encoder(tokens, lengths)
        alone = encoder(tokens[1:, :4], lengths[1:])
    assert both.shape == (2, EMBED)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5)


def test_the_text_projection_of_valid_positions_equals_the_projection_of_all_of_them():
    """Values and gradients at the valid positions as the projection of every position gives them; 0 at the pads."""
    torch.manual_seed(8)
    projection = torch.nn.Linear(12, 6)
    states, lengths = torch.randn(4, 7, 12, requires_grad=True), torch.tensor([7, 2, 5, 1])
    valid = torch.arange(7)[None, :] < lengths[:, None]
    weights = torch.randn(4, 7, 6) * valid.unsqueeze(-1)  # a loss that reads the valid positions only
    packed = project_valid_positions(projection, states, lengths)
    grads = torch.autograd.grad((packed * weights).sum(), [states, projection.weight, projection.bias])
    every = projection(states)
    expected = torch.autograd.grad((every * weights).sum(), [states, projection.weight, projection.bias])
    torch.testing.assert_close(packed[valid], every[valid])
    assert torch.all(packed[~valid] == 0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    full = torch.full((4,), 7)
    assert torch.equal(project_valid_positions(projection, states, full), every)  # no pads: one product
    assert project_valid_positions(torch.nn.Identity(), states, lengths) is states


def test_text_model_directory_without_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        HFTextModel(tmp_path)
    with pytest.raises(ConfigError, match="vocabulary size"):
        build_text_encoder(model_config(), vocab_size=None)


# ---------------------------------------------------------------- the model

def test_forward_backward_and_any_region_count():
    torch.manual_seed(0)
    model = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB)
    for batch in (region_batch(regions=5, lengths=[5, 3, 5, 1]), region_batch(regions=49, seed=1)):
        losses = model(batch)
        assert set(losses) == {"loss", "batch", "queue_i2t", "queue_t2i"}
        assert torch.isfinite(losses["loss"])
        model.zero_grad()
        losses["loss"].backward()
        for name in ("image_encoder.head.fc.weight", "image_encoder.sge.scorer.weight",
                     "text_encoder.sequence.embed.weight", "image_encoder.pooling.scorer.weight"):
            assert model.get_parameter(name).grad.abs().sum() > 0, name
        assert all(p.grad is None for p in model.image_key_encoder.parameters())


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(1)
    model = USERModel(model_config(use_queue=False), RetrievalLossConfig(), vocab_size=VOCAB).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=3e-3))
    batch = region_batch(num=6, regions=7, seed=2)
    first = model(batch)["loss"].item()
    for _ in range(15):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    assert model(batch)["loss"].item() < first - 0.1


def test_first_step_uses_the_empty_queue_then_queues_this_steps_keys():
    torch.manual_seed(2)
    model = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB).train()
    batch = region_batch(num=3, seed=3)
    img = model.image_encoder(batch["regions"], batch["region_lengths"])
    txt = model.text_encoder(batch["tokens"], batch["token_lengths"])
    with torch.no_grad():
        img_key = model.image_key_encoder(batch["regions"], batch["region_lengths"])
        txt_key = model.text_key_encoder(batch["tokens"], batch["token_lengths"])
    reference = build_retrieval_loss("uto", mu=90.0, gamma=0.5)
    empty = torch.zeros(8, EMBED)
    expected = reference(img, txt, batch["image_ids"], img_key, txt_key, empty, empty,
                         torch.full((8,), -1), torch.zeros(8, dtype=torch.bool))
    losses = model(batch)
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key])
    assert int(model.image_queue.filled) == int(model.text_queue.filled) == 3
    torch.testing.assert_close(model.image_queue.keys[:3], img_key)
    torch.testing.assert_close(model.text_queue.keys[:3], txt_key)
    assert model.image_queue.ids[:3].tolist() == batch["image_ids"].tolist()
    model.eval()
    model(region_batch(num=3, seed=4))
    assert int(model.image_queue.filled) == 3  # evaluation never writes the queue


def _step_on(threads, config, batch, monkeypatch, where):
    """A training-mode forward on ``threads`` threads from seed 6: its losses, queued keys and next random draw;
    ``where`` gets the thread that ran the image key tower."""
    torch.set_num_threads(threads)
    torch.manual_seed(6)
    model = USERModel(config, RetrievalLossConfig(), vocab_size=VOCAB).train()
    tower = model.image_key_encoder.forward
    monkeypatch.setattr(model.image_key_encoder, "forward",
                        lambda *a: where.append(threading.current_thread().name) or tower(*a))
    losses = model(batch)
    return losses, model.image_queue.keys.clone(), model.text_queue.keys.clone(), torch.rand(3)


def test_the_key_towers_run_beside_the_online_ones_with_the_losses_of_one_thread(monkeypatch):
    """On 2 threads the eval-mode key towers run on a side thread, each part on one thread: the losses, queued keys and
    random stream equal a 1-thread step's bit for bit."""
    config = model_config(sge_dropout=0.3, text_sge=True, embed_dim=64)
    batch, where, before = region_batch(num=16, regions=49, tokens_len=12, seed=5), [], torch.get_num_threads()
    try:
        one, two = _step_on(1, config, batch, monkeypatch, where), _step_on(2, config, batch, monkeypatch, where)
    finally:
        torch.set_num_threads(before)
    assert where[0] == threading.current_thread().name != where[1]
    assert one[0].keys() == two[0].keys()
    for key in one[0]:
        assert torch.equal(one[0][key], two[0][key]), key
    for a, b in zip(one[1:], two[1:]):
        assert torch.equal(a, b)


def test_key_towers_in_training_mode_stay_on_the_callers_thread(monkeypatch):
    """Their dropout draws from the stream the online towers draw from, so they run after them, on this thread."""
    where, before = [], torch.get_num_threads()
    try:
        _step_on(2, model_config(key_modes="follow", sge_dropout=0.3), region_batch(), monkeypatch, where)
    finally:
        torch.set_num_threads(before)
    assert where == [threading.current_thread().name]


def test_momentum_step_follows_the_formula_exactly():
    torch.manual_seed(3)
    model = USERModel(model_config(momentum=0.75), RetrievalLossConfig(), vocab_size=VOCAB).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-2))
    model(region_batch())["loss"].backward()
    optimizer.step()
    online = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    key_before = {k: v.clone() for k, v in model.image_key_encoder.state_dict().items()}
    model.momentum_step()
    key_after = model.image_key_encoder.state_dict()
    params = {name for name, _ in model.image_encoder.named_parameters()}
    moved = 0
    for name, value in key_after.items():
        if name in params:
            torch.testing.assert_close(value, 0.75 * key_before[name] + 0.25 * online[name])
            moved += int(not torch.equal(online[name], key_before[name]))
        else:  # buffers (BatchNorm statistics) are copied
            torch.testing.assert_close(value, online[name])
    assert moved > 0


def test_key_encoders_stay_in_eval_mode_unless_configured():
    model = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB).train()
    assert model.image_encoder.training and not model.image_key_encoder.training
    assert not model.text_key_encoder.training
    authors = USERModel(model_config(key_modes="follow"), RetrievalLossConfig(), vocab_size=VOCAB).train()
    assert authors.image_key_encoder.training and authors.text_key_encoder.training


def test_state_dict_round_trip_restores_queues_and_key_encoders():
    torch.manual_seed(4)
    model = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-2))
    for seed in range(3):  # 3 x 4 keys into a queue of 8: wraps around
        optimizer.zero_grad()
        model(region_batch(seed=seed))["loss"].backward()
        optimizer.step()
        model.momentum_step()
    state = copy.deepcopy(model.state_dict())
    assert {"image_queue.keys", "image_queue.ids", "image_queue.ptr", "text_queue.filled"} <= set(state)
    restored = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB)
    restored.load_state_dict(state)
    for name in ("keys", "ids", "ptr", "filled"):
        assert torch.equal(getattr(restored.image_queue, name), getattr(model.image_queue, name))
        assert torch.equal(getattr(restored.text_queue, name), getattr(model.text_queue, name))
    assert int(restored.image_queue.ptr) == 4
    for (name, a), (_, b) in zip(model.text_key_encoder.state_dict().items(),
                                 restored.text_key_encoder.state_dict().items()):
        assert torch.equal(a, b), name
    batch = region_batch(seed=9)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(batch)["loss"], model(batch)["loss"])


def test_without_queue_there_are_no_key_encoders():
    model = USERModel(model_config(use_queue=False), RetrievalLossConfig(name="hinge"), vocab_size=VOCAB)
    assert model.image_key_encoder is None and model.image_queue is None
    assert not any("key_encoder" in k or "queue" in k for k in model.state_dict())
    assert set(model(region_batch())) == {"loss", "batch"}
    model.momentum_step()  # a no-op


def test_encode_is_eval_mode_no_grad_and_keeps_the_training_flag():
    torch.manual_seed(5)
    model = USERModel(model_config(sge_dropout=0.5), RetrievalLossConfig(), vocab_size=VOCAB).train()
    batch = region_batch(lengths=[5, 2, 4, 5])
    first = model.encode_images(batch["regions"], batch["region_lengths"])
    again = model.encode_images(batch["regions"], batch["region_lengths"])
    texts = model.encode_texts(batch["tokens"], batch["token_lengths"])
    torch.testing.assert_close(first, again)  # no dropout, running statistics
    assert not first.requires_grad and first.shape == texts.shape == (4, EMBED)
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(4))
    assert model.image_encoder.training


def test_parameter_groups_cover_each_trainable_parameter_once(tiny_bert_dir):
    model = USERModel(model_config(text_encoder="bert", text_model=str(tiny_bert_dir)),
                      RetrievalLossConfig(name="infonce"))
    groups = model.parameter_groups(lr=1e-3, text_lr_scale=0.1, weight_decay=0.05)
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable) and len(set(listed)) == len(listed)
    key_params = {id(p) for p in model.image_key_encoder.parameters()} | \
                 {id(p) for p in model.text_key_encoder.parameters()}
    assert not key_params & set(listed)
    by_name = {g["name"]: g for g in groups}
    bert = {id(p) for p in model.text_encoder.sequence.parameters()}
    assert {id(p) for p in by_name["text_model"]["params"] + by_name["text_model_no_decay"]["params"]} == bert
    assert by_name["text_model"]["lr"] == pytest.approx(1e-4) and by_name["main"]["lr"] == pytest.approx(1e-3)
    for group in groups:
        assert all(p.ndim <= 1 for p in group["params"]) == group["name"].endswith("no_decay")
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else 0.05)
    assert id(model.loss.log_scale) in {id(p) for p in by_name["main_no_decay"]["params"]}


def test_images_path_with_a_tiny_backbone():
    torch.manual_seed(6)
    model = USERModel(model_config(image_input="images", backbone="resnet18", backbone_weights=None,
                                  backbone_trainable="partial"),
                      RetrievalLossConfig(), vocab_size=VOCAB).train()
    batch = region_batch(num=2)
    del batch["regions"], batch["region_lengths"]
    batch["images"] = torch.randn(2, 3, 64, 64)
    losses = model(batch)
    losses["loss"].backward()
    assert model.image_encoder.local_dim == 512
    assert model.image_encoder.head.fc.weight.grad.abs().sum() > 0
    assert model.encode_images(batch["images"]).shape == (2, EMBED)
    groups = {g["name"]: g for g in model.parameter_groups(lr=1.0, backbone_lr_scale=0.01)}
    assert groups["backbone"]["lr"] == pytest.approx(0.01)
    with pytest.raises(DataError, match="without lengths"):
        model.image_encoder(batch["images"], torch.tensor([4, 4]))


def test_a_batch_without_tokens_or_images_is_a_data_error():
    model = USERModel(model_config(use_queue=False), RetrievalLossConfig(), vocab_size=VOCAB)
    batch = region_batch()
    with pytest.raises(DataError, match="'tokens'"):
        model({k: v for k, v in batch.items() if k != "tokens"})
    with pytest.raises(DataError, match="neither 'images' nor 'regions'"):
        model({k: v for k, v in batch.items() if k != "regions"})


def test_authors_key_modes_run_the_image_key_in_train_mode_and_the_text_key_in_eval():
    model = USERModel(model_config(key_modes="authors"), RetrievalLossConfig(), vocab_size=VOCAB).train()
    assert model.image_key_encoder.training and not model.text_key_encoder.training
    model.eval()
    assert not model.image_key_encoder.training and not model.text_key_encoder.training


def test_head_options_set_the_mlp_width_and_keep_pytorch_default_init():
    torch.manual_seed(0)
    reference = torch.nn.Linear(12, 16)  # the default init draws the same numbers from the same seed
    torch.manual_seed(0)
    head = ProjectionHead(12, 16, hidden_dim=3, init="pytorch")
    assert torch.equal(head.fc.weight, reference.weight) and torch.equal(head.fc.bias, reference.bias)
    assert head.mlp[0].out_features == 3 and head.mlp[3].in_features == 3
    with pytest.raises(ConfigError, match="init"):
        ProjectionHead(12, 16, init="orthogonal")
    model = USERModel(model_config(head_hidden_dim=5), RetrievalLossConfig(), vocab_size=VOCAB)
    assert model.image_encoder.head.mlp[0].out_features == 5


def test_decay_all_puts_weight_decay_on_every_parameter():
    model = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    default = model.parameter_groups(lr=1e-3, weight_decay=0.1)
    assert any(g["weight_decay"] == 0.0 for g in default)
    every = model.parameter_groups(lr=1e-3, weight_decay=0.1, decay_all=True)
    assert all(g["weight_decay"] == 0.1 for g in every)
    assert sum(p.numel() for g in every for p in g["params"]) == trainable


def test_image_sge_on_joint_runs_sge_after_the_projection():
    torch.manual_seed(0)
    model = USERModel(model_config(image_sge_on="joint", sge=True), RetrievalLossConfig(), vocab_size=VOCAB).eval()
    encoder = model.image_encoder
    assert encoder.sge.local_branch[0].in_features == EMBED
    batch = region_batch()
    lengths = batch["region_lengths"]
    joint = encoder.sge(encoder.head(batch["regions"], lengths), lengths)
    want = torch.nn.functional.normalize(encoder.pooling(joint, lengths), dim=-1)
    torch.testing.assert_close(model.encode_images(batch["regions"], lengths), want)
