"""atheris harness for the proxy_protocol entry point (see run.py and README.md)."""
import run

if __name__ == '__main__':
    run.main('proxy_protocol')
