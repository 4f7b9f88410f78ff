"""The coordinator's OpenAI-compatible HTTP front (`app.py`) and OpenAI's shapes (`openai.py`)."""
