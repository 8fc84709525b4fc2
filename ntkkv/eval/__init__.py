"""Evaluation harnesses: LongBench (prompts, runs, metrics, scoring) and the needle test."""
