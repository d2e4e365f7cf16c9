"""One router per resource; ``api_router`` gathers them."""

from fastapi import APIRouter

from service.api.routes import (
    adapters,
    dashboard,
    datasets,
    files,
    generation,
    health,
    job_stream,
    jobs,
    methods,
    metrics,
    models,
    predict,
    reward,
    tenants,
)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(tenants.router)
api_router.include_router(datasets.router)
api_router.include_router(files.router)
api_router.include_router(jobs.router)
api_router.include_router(methods.router)
api_router.include_router(job_stream.router)
api_router.include_router(adapters.router)
api_router.include_router(models.router)
api_router.include_router(predict.router)
api_router.include_router(generation.router)
api_router.include_router(reward.router)
api_router.include_router(metrics.router)
api_router.include_router(dashboard.router)
