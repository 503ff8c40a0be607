"""Counterfactual explanations: C3LT (cycle-consistent latent transformations) and a latent-gradient
baseline, on a user's generator/encoder/classifier or on the shipped digits domain.

Import the submodules: `saliencylab.counterfactuals.c3lt`.
"""
