"""Counterfactual explanations: C3LT (cycle-consistent latent transformations) and a latent-gradient
baseline, on a user's generator/encoder/classifier or on the shipped digits domain.

Import the submodules: `saliencylab.counterfactuals.c3lt` (C3LT; it re-exports `digits_domain`),
`saliencylab.counterfactuals.digits` (the shipped domain), `saliencylab.counterfactuals.latent_gradient`.
Guide: docs/counterfactuals.md.
"""
