"""One validation per object, whatever the branch: a RunSpec checks every objective field with a top-k teacher
too, model shapes that cannot be built are refused from the spec and the recipe before any training, and the
Python API names the argument of the wrong type."""
import pytest
import torch

from opdlab.config.recipe import ModelRecipe
from opdlab.config.spec import RunSpec
from opdlab.core.estimators import token_advantages
from opdlab.errors import UserError
from opdlab.training.loop import train


@pytest.mark.parametrize("field, value", [("reduction", "bogus"), ("gamma", 7), ("log_u_clip", -1.0)])
def test_a_top_k_objective_checks_every_field(field, value):
    RunSpec.from_dict(dict(teacher_topk=2))  # the top-k branch itself is accepted
    with pytest.raises(UserError, match=f"{field} = "):
        RunSpec.from_dict(dict(teacher_topk=2, **{field: value}))
    with pytest.raises(UserError, match=f"{field} = "):
        RunSpec.from_dict({field: value})  # and the same on the whole-distribution branch


@pytest.mark.parametrize("hidden", [1, 3, 31])
def test_a_width_rotary_embeddings_cannot_turn_is_refused_before_training(hidden):
    for role in ("teacher", "student"):
        with pytest.raises(UserError, match="even number below 32"):
            RunSpec.from_dict({f"{role}_hidden": hidden})
    with pytest.raises(UserError, match="must be even"):
        ModelRecipe(hidden=hidden, heads=1)


def test_even_widths_below_32_and_multiples_of_32_are_built():
    for hidden in (2, 16, 64):
        spec = RunSpec.from_dict(dict(student_hidden=hidden))
        assert spec.models.recipe("student").hidden == hidden
    with pytest.raises(UserError, match="must be even"):
        ModelRecipe(hidden=6, heads=2)  # head width 3


def test_train_names_the_argument_of_the_wrong_type(tmp_path):
    with pytest.raises(UserError, match="spec must be a RunSpec, got dict"):
        train({"steps": 1}, tmp_path / "a")
    with pytest.raises(UserError, match="runtime must be None or a Runtime, got 'cpu'"):
        train(RunSpec(), tmp_path / "b", "cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written


def test_a_mask_that_is_not_a_tensor_is_refused_by_name():
    logp = torch.log(torch.full((2, 3), 0.5))
    token_advantages("reverse_kl", logp, logp, torch.ones(2, 3))  # a tensor mask is accepted
    with pytest.raises(UserError, match="mask_BT must be None or a torch tensor of shape \\(2, 3\\), got list"):
        token_advantages("reverse_kl", logp, logp, [[1, 1, 1], [1, 1, 0]])
