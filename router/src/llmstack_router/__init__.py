"""llmstack-router: one OpenAI endpoint per GPU node that swaps inference backends on demand."""

__version__ = "0.1.0"
