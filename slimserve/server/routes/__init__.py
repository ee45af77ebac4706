"""The OpenAI layer's endpoints, one module each (as vLLM's `entrypoints/openai/serving_*.py`): each holds a
FastAPI `APIRouter` that `app.create_app` includes. What they share lives in `app.state.dispatcher`
(`dispatch.Dispatcher`: the pool, the router, the metrics), read through the `dispatch.dispatcher`
dependency."""
