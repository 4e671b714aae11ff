"""SiD on a guided (CFG) teacher: SiD-LSG's settings, kappa_1 = kappa_2 = kappa_4, alpha 1, t in [20, 980) (issue 27).

mingyuanzhou/SiD-LSG run_sid.sh and the released checkpoints (``cfg4.54.54.5``, ``cfg1.51.51.5``) always set
``--cfg_train_fake`` = ``--cfg_eval_fake`` = ``--cfg_eval_real``, ``--alpha 1`` and sid_train.py's ``--tmin 20``
``--tmax 980`` (``randint(tmin, tmax)``); fastdiff's defaults for a guided teacher must be those, and an unguided
class teacher keeps SiD's (alpha 1.2, t <= 0.8, no fake-score guidance).
"""
import copy

import torch

from fastdiff.config import load_config
from fastdiff.models.teacher import load_teacher
from fastdiff.training.setup import build_objective, student_like


def _sid(path, guidance, *sets):
    """SiD as a run builds it (config -> teacher_defaults -> objective), its fake score an exact copy of the teacher."""
    teacher = load_teacher(path, guidance)
    cfg = load_config(None, [f"teacher.path={path}", f"teacher.guidance_scale={guidance}", "objective.name=sid", *sets])
    fake = student_like(teacher, copy.deepcopy(teacher.model))
    return build_objective(cfg, teacher, fake, None)


def test_guided_teacher_guides_the_fake_score_as_sid_lsg(tiny_cond_teacher):
    obj = _sid(tiny_cond_teacher, 2.0)
    assert (obj.fake_guidance, obj.fake_train_guidance, obj.alpha) == (2.0, 2.0, 1.0)
    # randint(20, 980) draws timesteps 20..979: the positions fastdiff's sample_sigma turns into int(0.02 T) and
    # int(0.979 T) inclusive on the 1000-step table
    assert (int(obj.min_t * 1000), int(obj.max_t * 1000)) == (20, 979)
    plain = _sid(tiny_cond_teacher, 1.0)
    assert (plain.fake_guidance, plain.fake_train_guidance, plain.alpha) == (1.0, 1.0, 1.2)  # SiD's own
    assert (plain.min_t, plain.max_t) == (0.0, 0.8)
    # a value the config sets wins over the rule
    mine = _sid(tiny_cond_teacher, 2.0, "objective.fake_guidance=1.0", "objective.alpha=1.2")
    assert (mine.fake_guidance, mine.fake_train_guidance, mine.alpha) == (1.0, 2.0, 1.2)
    # sida keeps SiDA's own settings (a variant's defaults come first): it has no guided reference
    sida = _sid(tiny_cond_teacher, 2.0, "objective.name=sida")
    assert (sida.fake_guidance, sida.fake_train_guidance, sida.alpha, sida.max_t) == (1.0, 1.0, 1.0, 0.8)


def test_guided_loss_is_zero_when_the_fake_score_is_the_teacher(tiny_cond_teacher):
    """With kappa_2 = kappa_4 a fake score equal to the teacher gives y_r = y_f exactly, so the SiD loss and its
    gradient vanish: the loss has its zero where the fake score matches. With an unguided fake score (kappa_2 = 1,
    the old default) the same networks leave y_r - y_f = CFG term and a gradient that never goes away."""
    labels = {"class_labels": torch.tensor([0, 1, 2, 0])}
    for sets, zero in (((), True), (("objective.fake_guidance=1.0",), False)):
        obj = _sid(tiny_cond_teacher, 2.0, *sets)
        torch.manual_seed(0)
        x = torch.randn(4, 1, 8, 8, requires_grad=True)
        loss, _ = obj.generator_loss(x, labels)
        grad, = torch.autograd.grad(loss, x)
        # the same network on the same inputs through the same ops: bitwise equal outputs, an exact zero
        loss, top = float(loss.detach()), float(grad.abs().max())
        assert (loss == 0.0 and top == 0.0) == zero, (loss, top)


def test_sid_on_text_teachers_trains_at_sid_lsgs_rate(tiny_teacher):
    """Every SiD-LSG run_sid.sh command: --lr 0.000001 --glr 0.000001. Only plain sid on a text teacher; sida and
    uni_instruct (no text reference) and class-conditional teachers keep SiD's 1e-5 fallback; a set rate wins."""
    from types import SimpleNamespace

    from fastdiff.config import load_config
    from fastdiff.models.teacher import load_teacher
    from fastdiff.objectives import build
    from fastdiff.objectives.gan import GANHead
    from fastdiff.training.setup import resolve_train_defaults

    d = load_teacher(tiny_teacher).denoiser
    text, pixels = SimpleNamespace(conditioning="text"), SimpleNamespace(conditioning=None)
    sid, sida = build("sid", d, d), build("sida", d, d, gan_head=GANHead(d, "sida"))
    assert sid.teacher_train_defaults(text) == {"lr_generator": 1e-6, "lr_critic": 1e-6}
    assert sid.teacher_train_defaults(pixels) == {} and sida.teacher_train_defaults(text) == {}
    for overrides, expected in (([], (1e-6, 1e-6)), (["train.lr_generator=3e-6"], (3e-6, 1e-6))):
        cfg = load_config(None, ["objective.name=sid", *overrides])
        resolve_train_defaults(cfg, sid, text)
        assert (cfg.train.lr_generator, cfg.train.lr_critic) == expected
