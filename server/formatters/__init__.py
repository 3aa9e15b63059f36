"""Response formatters: LMI json/jsonlines/sse/TGI and OpenAI chat."""
