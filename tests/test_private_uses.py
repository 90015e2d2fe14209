"""Where sculpt leans on a library's private names, or redoes a library's private code through its public API.

Cheap checks that fail when an upgrade changes what sculpt relies on, before a job finds out:

- Ray Data: ``sculpt.engine.dataset.forget_old_block_stats`` (no public way to bound Ray Data's per-block
  statistics; its effect on a real Dataset is tests/test_workflow.py's
  ``test_ray_datas_per_block_statistics_are_kept_to_the_last_blocks_of_each_operator``);
- sam2: the mask stage and EVF-SAM2 compute SAM2's image embedding and input normalisation themselves
  (``sculpt.models.sam2_features``, ``actors.mask.normalise``), as ``SAM2ImagePredictor`` does with private code;
- vLLM: ``actors.vlm.VLMEngine.core_pids`` reads the engine core processes' handles from the engine's client
  (checked on a real engine by tests/test_vlm.py's ``test_the_engine_names_its_one_core_process``).
"""

import inspect
import types
import typing

import numpy as np
import pytest

from sculpt.engine import dataset


# -- Ray Data ----------------------------------------------------------------------------------------------------


def test_ray_data_still_has_the_private_names_that_forget_old_block_stats_uses(monkeypatch):
    import ray.data
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.interfaces.physical_operator import PhysicalOperator
    from ray.data._internal.execution.operators.map_operator import MapOperator
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    from ray.data._internal.execution.streaming_executor_state import Topology

    callback = dataset.forget_old_block_stats()
    assert issubclass(callback, ExecutionCallback)
    assert "on_execution_step" in vars(ExecutionCallback)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "custom_execution_callback_classes", [callback])
    assert callback in ctx.execution_callback_classes  # what the planner instantiates for each Dataset run
    # the executor hands itself to every callback at every step, and keeps its operators in _topology
    source = inspect.getsource(StreamingExecutor)
    assert "callback.on_execution_step(self)" in source and "self._topology = build_streaming_topology(" in source
    assert typing.get_args(Topology)[0] is PhysicalOperator  # {operator: its state}
    # an operator's get_stats hands out its own list of per-block statistics, not a copy
    kept = []
    assert MapOperator.get_stats(types.SimpleNamespace(_name="Map(f)", _output_blocks_stats=kept))["Map(f)"] is kept


def test_forget_old_block_stats_trims_each_operators_own_lists_to_the_last_blocks(monkeypatch):
    monkeypatch.setattr(dataset, "BLOCK_STATS_KEPT", 3)

    class Operator:
        def __init__(self, n):
            self.stats = {"blocks": list(range(n)), "summary": {"rows": n}}

        def get_stats(self):
            return self.stats

    few, many = Operator(6), Operator(7)
    executor = types.SimpleNamespace(_topology={few: None, many: None})
    dataset.forget_old_block_stats()().on_execution_step(executor)
    assert few.stats["blocks"] == list(range(6))  # up to twice the window: left as it is
    assert many.stats["blocks"] == [4, 5, 6] and many.stats["summary"] == {"rows": 7}


# -- sam2 --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam2_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from actors.mask import build_sam2_model
    from sculpt.testing import tiny_sam2

    return build_sam2_model(tiny_sam2.write(str(tmp_path_factory.mktemp("sam2"))), "cpu")


def images(n, side):
    return [(np.random.default_rng(i).random((side, side, 3)) * 255).astype(np.uint8) for i in range(n)]


def test_sam2_image_features_are_the_predictors(sam2_model):
    """``sculpt.models.sam2_features.image_features`` against what ``SAM2ImagePredictor.set_image_batch`` keeps
    in its private ``_features`` (through the model's private ``_prepare_backbone_features``): equal tensors."""
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from actors.mask import normalise
    from sculpt.models import sam2_features

    batch = images(2, sam2_model.image_size)
    predictor = SAM2ImagePredictor(sam2_model)
    with torch.inference_mode():
        predictor.set_image_batch(batch)
        ours = sam2_features.image_features(sam2_model, normalise(torch.from_numpy(np.stack(batch))))
    theirs = predictor._features
    assert torch.equal(ours["image_embed"], theirs["image_embed"])
    assert len(ours["high_res_feats"]) == len(theirs["high_res_feats"]) == 2
    for a, b in zip(ours["high_res_feats"], theirs["high_res_feats"]):
        assert torch.equal(a, b)


def test_the_masker_normalises_its_input_as_sam2_transforms_do():
    torch = pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from sam2.utils.transforms import SAM2Transforms

    from actors.mask import SAM2_MEAN, SAM2_STD, normalise

    transforms = SAM2Transforms(resolution=64, mask_threshold=0.0)
    assert (tuple(transforms.mean), tuple(transforms.std)) == (SAM2_MEAN, SAM2_STD)
    batch = images(2, 64)
    ours = normalise(torch.from_numpy(np.stack(batch)))
    assert ours.is_contiguous() and torch.equal(ours, transforms.forward_batch(batch))
