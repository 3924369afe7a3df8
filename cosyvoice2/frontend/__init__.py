"""Text and audio front end: tokenizer, text normalisation, audio features, prompt processing."""
