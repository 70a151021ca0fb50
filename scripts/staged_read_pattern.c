// The read half of a staged miss, by layout: pread from a tmpfs file into a buffer by a pool of
// threads, one expert after another (a barrier per expert, as rayon's join), in the staged
// path's pieces (`experts::source::piece_len`: total / 2·threads, clamped to 256 KiB – 1 MiB).
// Patterns: bf16 experts (three 3 MiB parts back to back in the file) and GGUF Q8_0 experts of
// Qwen3-30B-A3B (three 1,671,168-byte parts, one in each of three stacked regions), with the
// file offsets aligned or shifted by 32 / 2,080 bytes (GGUF aligns tensor data to 32 bytes only).
// Why: the staged probe read 10 GB/s on a Q8_0 GGUF file against 24–31 GB/s on bf16 shards on
// the same machine kind (BENCHMARKS.md §90, §92). Build and run (no Rust toolchain needed there):
//   gcc -O2 -static -pthread scripts/staged_read_pattern.c -o staged_read_pattern
//   ./staged_read_pattern /dev/shm/pattern.bin THREADS FILE_MIB     # e.g. 16 4096
// The file is written once (pwrite, so tmpfs holds real pages) and left for the next run.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
static int fd, nth; static char *buf; static pthread_barrier_t bar;
static size_t part_len, piece; static size_t region[3]; static long shift; static int nexp, stacked;
static double now(){struct timespec ts;clock_gettime(CLOCK_MONOTONIC,&ts);return ts.tv_sec+ts.tv_nsec*1e-9;}
static size_t npp; // pieces per part
static void *work(void*a){ long t=(long)a;
  for(int e=0;e<nexp;e++){ pthread_barrier_wait(&bar);
    for(size_t k=t;k<3*npp;k+=nth){ int p=k/npp; size_t in=(k%npp)*piece; size_t n=part_len-in<piece?part_len-in:piece;
      size_t foff = stacked ? region[p]+(size_t)e*part_len+in : (size_t)e*3*part_len+p*part_len+in;
      if(pread(fd,buf+(size_t)(e&1)*3*part_len+p*part_len+in,n,foff+shift)!=(ssize_t)n){perror("pread");exit(1);} }
    pthread_barrier_wait(&bar);}
  return 0;}
static double run(int nthreads){ nth=nthreads; pthread_t th[128]; pthread_barrier_init(&bar,0,nth+1);
  for(long i=0;i<nth;i++) pthread_create(&th[i],0,work,(void*)i);
  double t0=0; for(int e=0;e<nexp;e++){ if(e==nexp/10) t0=now(); pthread_barrier_wait(&bar); pthread_barrier_wait(&bar);}
  double dt=now()-t0; for(int i=0;i<nth;i++) pthread_join(th[i],0); pthread_barrier_destroy(&bar);
  return (double)(nexp-nexp/10)*3*part_len/dt/1e9;}
int main(int argc,char**argv){ const char*path=argv[1]; int threads=atoi(argv[2]); size_t filesz=(size_t)atol(argv[3])<<20;
  fd=open(path,O_RDWR|O_CREAT,0644); char*z=malloc(1<<20); for(int i=0;i<1<<20;i++) z[i]=i*7;
  struct stat st; fstat(fd,&st); if((size_t)st.st_size<filesz) for(size_t o=0;o<filesz;o+=1<<20) pwrite(fd,z,1<<20,o);
  if(posix_memalign((void**)&buf,1<<21,64<<20)) return 1;
  memset(buf,1,64<<20);
  size_t q8=1671168, bf=3145728;
  struct {const char*name; size_t len; int stacked; long shift;} cases[]={
    {"bf16 contiguous, aligned",bf,0,0},{"bf16 contiguous, +32",bf,0,32},
    {"q8_0 stacked, aligned",q8,1,0},{"q8_0 stacked, +32",q8,1,32},{"q8_0 stacked, +2080",q8,1,2080},
    {"q8_0 contiguous, aligned",q8,0,0}};
  for(int rep=0;rep<2;rep++) for(unsigned c=0;c<sizeof cases/sizeof*cases;c++){
    part_len=cases[c].len; stacked=cases[c].stacked; shift=cases[c].shift;
    size_t total=3*part_len; size_t pl=total/(2*threads); if(pl<262144) pl=262144; if(pl>1<<20) pl=1<<20; pl&=~1UL; piece=pl;
    npp=(part_len+piece-1)/piece;
    nexp=(int)((filesz-(8<<20))/(3*part_len)); if(nexp>400) nexp=400;
    size_t span=(filesz-(8<<20))/3; for(int p=0;p<3;p++) region[p]=p*span; if((size_t)nexp*part_len>span) nexp=span/part_len;
    double g=run(threads);
    printf("%-26s threads %2d piece %4zuK experts %3d: %5.1f GB/s (%.0f us/expert)\n",cases[c].name,threads,piece>>10,nexp,g,total/g/1e3);
  }
  return 0;}
