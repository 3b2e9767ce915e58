"""Where the published Prometheus-Vision sample rows live in the test tree.

The rows (kaistAI/prometheus-vision, Apache-2.0, copied unchanged; see the folder's README) ship with
the tests so that loader and exporter tests run on a clean CI checkout.
"""

from pathlib import Path

PROMETHEUS_VISION = Path(__file__).parent / "data" / "prometheus-vision"
