"""POST /v1/embeddings."""
from __future__ import annotations

import asyncio
import base64

import numpy as np

from kvserve.core.entrypoints.openai.errors import APIError, bad_request
from kvserve.core.entrypoints.openai.protocol import EmbeddingRequest
from kvserve.core.entrypoints.openai.serving_common import OpenAIServing, new_id, now
from kvserve.core.entrypoints.openai.serving_completion import split_prompts
from kvserve.core.outputs import EmbeddingRequestOutput
from kvserve.core.pooling_params import PoolingParams


def encode(embedding: list[float], encoding_format: str) -> list[float] | str:
    """The embedding as OpenAI sends it: floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode()


class OpenAIServingEmbedding(OpenAIServing):
    async def create(self, request: EmbeddingRequest) -> dict:
        model = self.model_name(request.model)
        if self.models.lora(model) is not None:
            raise APIError(400, f"model {model!r} is a LoRA adapter, which serves completions and chat, not "
                                f"embeddings", "model")
        token_ids, params = await self.offload(self.prepare, request, model)
        request_id = new_id("embd")
        outputs = await self.embed(request_id, token_ids, params)
        data = [{"object": "embedding", "index": i, "embedding": encode(o.outputs.embedding, request.encoding_format)}
                for i, o in enumerate(outputs)]
        prompt_tokens = sum(map(len, token_ids))
        return {"id": request_id, "object": "list", "created": now(), "model": model, "data": data,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

    def prepare(self, request: EmbeddingRequest, model: str) -> tuple[list[list[int]], PoolingParams]:
        """The request's token ids and pooling parameters, checked against the model and the limits."""
        params = PoolingParams(dimensions=request.dimensions)
        try:
            self.inputs.check_pooling(params, model)
        except ValueError as exc:
            raise bad_request(exc, set(EmbeddingRequest.model_fields)) from exc
        prompts = split_prompts(request.input, "input")
        self.limits.check_prompt_count(len(prompts))
        token_ids = [self.tokenize(p, "input") for p in prompts]
        self.limits.check_tokens(sum(map(len, token_ids)))
        return token_ids, params

    async def embed(self, request_id: str, token_ids: list[list[int]],
                    params: PoolingParams) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding, the prompts run at once; a failure or a disconnect aborts those still running."""
        async def one(i: int) -> EmbeddingRequestOutput:
            async for output in self.engine.generate(f"{request_id}-{i}", token_ids[i], params, token_ids[i]):
                pass
            return output   # a pooled prompt's only output

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(token_ids))]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
