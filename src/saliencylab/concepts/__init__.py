"""Concept-level explanations: explanation networks (XNN) and concept contributions on B-cos networks.

Import the submodules: `saliencylab.concepts.xnn`, `saliencylab.concepts.bcos_concepts`.
"""
