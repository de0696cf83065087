"""Varied prompts for engine tests (chat-templated by the tests that need it)."""

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "Give me a name for a pet turtle, and explain the choice in a few words please.",
    "2 + 2 =",
    "Write a Python function that reverses a string.",
    "What is photosynthesis?",
    "Name the planets of the solar system in order from the sun.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What does HTTP stand for?",
    "Suggest a healthy breakfast.",
    "How many legs does a spider have?",
    "Write a SQL query that counts the rows of a table named users.",
    "Why do cats purr?",
    "Complete the sequence: 1, 1, 2, 3, 5, 8,",
    "What is the boiling point of water at sea level in Celsius?",
    "Tell me a short joke about computers.",
]
