"""Evaluation of slide/tile embeddings: linear probe and kNN, ABMIL, teacher-feature fidelity."""
