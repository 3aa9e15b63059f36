"""SageMaker runtime API pieces: the `application/vnd.amazon.eventstream` encoder used by the streaming route."""
