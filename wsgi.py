"""gunicorn entry point: `gunicorn -c gunicorn.conf.py wsgi:app` (DESIGN.md section 2)."""
import webapp

app = webapp.create_app()
