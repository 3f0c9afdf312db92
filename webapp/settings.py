"""Django settings, read from the environment. No variable set = one machine, SQLite (WAL), SqliteHuey.

DATABASE_URL  -> PostgreSQL (or any dj-database-url URL)
REDIS_URL     -> RedisHuey queue + channels_redis layer, so workers on several GPU hosts share the work
TRAINYARD_DATA_DIR -> uploads, models, run outputs (default ./var)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url
import plotly

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TRAINYARD_DATA_DIR", BASE_DIR / "var")).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    if os.environ.get("DJANGO_SECRET_KEY"):
        return os.environ["DJANGO_SECRET_KEY"]
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = os.environ.get("TRAINYARD_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("TRAINYARD_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("TRAINYARD_CSRF_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "huey.contrib.djhuey",
    "ninja",  # serves Swagger UI's assets from this server (/api/docs works offline), not a CDN
    "webapp.workspaces",
    "webapp.datasets",
    "webapp.runs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "webapp.csp.ContentSecurityPolicyMiddleware",  # no inline script anywhere: page scripts are static files
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "webapp.workspaces.middleware.PagesNeedLoginMiddleware",  # every page needs a login
]

ROOT_URLCONF = "webapp.urls"
ASGI_APPLICATION = "webapp.asgi.application"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "webapp.workspaces.context.workspace",
            ]
        },
    }
]

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("TRAINYARD_SQLITE_PATH", DATA_DIR / "trainyard.sqlite3"),
            "OPTIONS": {
                # WAL: the worker writes a metric per step while pages read; measured 10x faster writes.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
            "TEST": {"NAME": str(DATA_DIR / "test.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
HUEY_IMMEDIATE = os.environ.get("TRAINYARD_HUEY_IMMEDIATE", "") == "1"
QUEUE_NAME = os.environ.get("TRAINYARD_QUEUE", "trainyard")
if REDIS_URL:
    HUEY = {"huey_class": "huey.RedisHuey", "name": QUEUE_NAME, "url": REDIS_URL, "immediate": HUEY_IMMEDIATE}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
    # Shared by every web process: login rate limits hold across hosts.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    HUEY = {
        "huey_class": "huey.SqliteHuey",
        "name": QUEUE_NAME,
        "filename": str(DATA_DIR / "huey.sqlite3"),
        "immediate": HUEY_IMMEDIATE,
        # SQLite can't wake a worker: an idle one polls, backing off from 0.1 s up to this (huey's
        # default 10 s made a run wait up to 10 s in the queue; a poll is one tiny transaction).
        "consumer": {"max_delay": 0.25},
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [{"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"}]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static", ("plotly", Path(plotly.__file__).parent / "package_data")]
WHITENOISE_USE_FINDERS = True  # serve straight from the app folders: no collectstatic step
WHITENOISE_AUTOREFRESH = DEBUG

# Uploads stream to a temporary file, never into memory.
FILE_UPLOAD_HANDLERS = ["django.core.files.uploadhandler.TemporaryFileUploadHandler"]
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "tmp")
(DATA_DIR / "tmp").mkdir(exist_ok=True)
TRAINYARD_MAX_UPLOAD_BYTES = int(os.environ.get("TRAINYARD_MAX_UPLOAD_BYTES", 2 * 1024**3))
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

# Models a config may name by folder: hub ids, or folders under these directories.
TRAINYARD_MODEL_DIRS = [Path(p) for p in os.environ.get("TRAINYARD_MODEL_DIRS", str(DATA_DIR / "models")).split(":")]
TRAINYARD_GPUS = os.environ.get("TRAINYARD_GPUS", "")  # "0,1" or a count; default: the CUDA devices torch sees
# Faults (docs/faults.md). Seconds: a worker that stops beating this long loses its runs to a reaper
# (a paused worker is fenced off); every worker reaps this often (a dead worker of the same host is
# seen by its pid at once); a trainer in its loop that stops beating this long (or twice its slowest
# step seen, if longer) is killed as hung.
TRAINYARD_HEARTBEAT_TIMEOUT = float(os.environ.get("TRAINYARD_HEARTBEAT_TIMEOUT", 30))
TRAINYARD_MIN_FREE_MB = int(os.environ.get("TRAINYARD_MIN_FREE_MB", 100))  # a run starts only with this free
TRAINYARD_REAP_SECONDS = float(os.environ.get("TRAINYARD_REAP_SECONDS", 5))
TRAINYARD_PROGRESS_TIMEOUT = float(os.environ.get("TRAINYARD_PROGRESS_TIMEOUT", 600))
TRAINYARD_ALLOW_TRUST_REMOTE_CODE = os.environ.get("TRAINYARD_ALLOW_TRUST_REMOTE_CODE", "") == "1"

SESSION_COOKIE_HTTPONLY = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
if not DEBUG and os.environ.get("TRAINYARD_HTTPS", "") == "1":
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"trainyard": {"handlers": ["console"], "level": "INFO"}},
}
