"""Predictive elasticity: routing statistics, popularity predictors, prewarm and keep-alive."""
