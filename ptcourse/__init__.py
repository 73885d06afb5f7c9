"""ptcourse: the helper library of the pretraining and fine-tuning course.

    import ptcourse
    P = ptcourse.profile()                       # smoke / cpu / gpu, device, precision
    train = ptcourse.data.load("mnist", "train", per_class=10)
    history = ptcourse.fit(model, loader, epochs=3, val_loader=val, metrics={"acc": ptcourse.accuracy})
    ptcourse.report("00_getting_started", {"val_acc": history.last["val_acc"]})

One module per concept: ``profile`` (run profiles, seeding), ``data`` (datasets), ``training``
(``fit``, ``evaluate``, ``predict``), ``history``, ``checkpoint``, ``losses``, ``plots``,
``checks`` (exercise checks), ``report`` (results), ``doctor`` (environment check),
``exercises`` (builds exercises/ from solutions/).
"""
from . import checkpoint, data, losses, plots, probes
from .doctor import doctor
from .history import History
from .profile import Profile, profile, seed_everything
from .report import report
from .training import NonFiniteLossError, accuracy, evaluate, fit, predict
from . import checks  # noqa: E402  (last: the chapter checks use the modules above)

__version__ = "0.1.0"
__all__ = ["Profile", "profile", "seed_everything", "doctor", "data", "fit", "evaluate", "predict",
           "accuracy", "History", "NonFiniteLossError", "report", "losses", "plots", "probes", "checkpoint", "checks"]
