"""spirt: SPIRT peer-to-peer serverless training with in-database aggregation, as a benchmark and
security-evaluation harness."""

__version__ = "0.1.0"
