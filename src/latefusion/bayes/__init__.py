"""Bayesian fusion of task summaries: hierarchical models with adaptive shrinkage.

``spec`` parses and validates model spec files (the catalogue in ``models/``), ``model``
builds the PyMC model and holds a small NumPy core, ``fit`` samples, diagnoses and summarises.

>>> from latefusion.bayes import fit_bayes, list_models, load_spec
>>> fit = fit_bayes(summaries, model="horseshoe", seed=1)       # doctest: +SKIP
>>> fit.result.table()                                           # doctest: +SKIP
"""

from latefusion.bayes.fit import BayesFit, fit_bayes, nutpie_available, sample_prior
from latefusion.bayes.model import build_model, coef_scales
from latefusion.bayes.spec import ModelSpec, list_models, load_spec

__all__ = [
    "BayesFit",
    "ModelSpec",
    "build_model",
    "coef_scales",
    "fit_bayes",
    "list_models",
    "load_spec",
    "nutpie_available",
    "sample_prior",
]
