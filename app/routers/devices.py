"""Example routes. Every module in app/routers that defines `router` is discovered at startup."""

from app.controllers.device_controller import DeviceController
from app.controllers.sensor_controller import SensorController
from app.middleware.timing import TimingMiddleware
from core.router import Router

router = Router()
router.on("devices/{device_id}/status", DeviceController.status, qos=1)
router.on("devices/{device_id}/command", DeviceController.command, qos=1)

with router.group(prefix="sensors", middleware=[TimingMiddleware()]) as sensors:
    sensors.on("{sensor_id}/data", SensorController.data, qos=1, shared=True, worker_count=2)

router.on("logs/{path:#}", SensorController.log)
