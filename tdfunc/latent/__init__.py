"""Latent-space analysis: representation geometry (intrinsic dimension, CKA, information imbalance).

Every function takes one representation ``(N, D)``, a stack ``(R, N, D)`` or a TensorDict of
representations ``{site: (N, D_site)}`` and returns one result per representation (or per pair).
"""
