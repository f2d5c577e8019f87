"""Prediction: host-pair traffic forecasts, VM placement and what-if of a move."""
