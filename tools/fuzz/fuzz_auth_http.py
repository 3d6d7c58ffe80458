"""atheris harness for the auth_http entry point (see run.py and README.md)."""
import run

if __name__ == '__main__':
    run.main('auth_http')
